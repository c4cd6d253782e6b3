// Runs a step repeatedly for a fixed time after a warm-up and reports
// events per second as one JSON line, the format scripts/bench-peers.sh
// reads.
const SECONDS = Number(process.env.SLUICE_PEERS_SECONDS || 5);

function measure(step, eventsPerStep = 1) {
  let sink = 0;
  const warmUntil = process.hrtime.bigint() + 1_000_000_000n;
  while (process.hrtime.bigint() < warmUntil) sink += step().length;
  let steps = 0;
  const started = process.hrtime.bigint();
  const until = started + BigInt(SECONDS * 1e9);
  let now = started;
  while (now < until) {
    for (let i = 0; i < 50; i++) sink += step().length;
    steps += 50;
    now = process.hrtime.bigint();
  }
  const seconds = Number(now - started) / 1e9;
  if (sink === 0) throw new Error('the step produced nothing');
  return (steps * eventsPerStep) / seconds;
}

function report(name, eventsPerSecond) {
  console.log(JSON.stringify({ name, events_per_second: Math.round(eventsPerSecond) }));
}

module.exports = { measure, report };
