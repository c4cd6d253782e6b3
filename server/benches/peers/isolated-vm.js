// isolated-vm, an isolate per plugin as RudderStack runs user
// transformations: the event crosses into each isolate as JSON text and
// comes back as JSON text, one call per event, or one call per batch of
// 100 events.
const fs = require('fs');
const path = require('path');
const ivm = require('isolated-vm');
const { plugins } = require('./transforms');
const { measure, report } = require('./measure');

const text = fs.readFileSync(path.join(__dirname, 'event.json'), 'utf8');
const BATCH = 100;
const batchText = JSON.stringify(Array.from({ length: BATCH }, () => JSON.parse(text)));

const chain = plugins.map((source) => {
  const isolate = new ivm.Isolate({ memoryLimit: 64 });
  const context = isolate.createContextSync();
  isolate.compileScriptSync(`${source}
    function runOne(json) { return JSON.stringify(processEvent(JSON.parse(json))); }
    function runBatch(json) { return JSON.stringify(JSON.parse(json).map(processEvent)); }
  `).runSync(context);
  return {
    one: context.global.getSync('runOne', { reference: true }),
    batch: context.global.getSync('runBatch', { reference: true }),
  };
});

report('isolated-vm, isolate per plugin, per event', measure(() => {
  let json = text;
  for (const plugin of chain) json = plugin.one.applySync(undefined, [json]);
  return json;
}));

report(`isolated-vm, isolate per plugin, batches of ${BATCH}`, measure(() => {
  let json = batchText;
  for (const plugin of chain) json = plugin.batch.applySync(undefined, [json]);
  return json;
}, BATCH));
