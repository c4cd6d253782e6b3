// Node's vm module, the way JavaScript plugin servers run plugins: a
// context per plugin, the host parses the event once, calls each plugin's
// processEvent on the same object, and serialises once.
const fs = require('fs');
const path = require('path');
const vm = require('vm');
const { plugins } = require('./transforms');
const { measure, report } = require('./measure');

const text = fs.readFileSync(path.join(__dirname, 'event.json'), 'utf8');
const chain = plugins.map((source) => {
  const context = vm.createContext({});
  new vm.Script(source).runInContext(context);
  return context.processEvent;
});

report('node vm, context per plugin', measure(() => {
  let event = JSON.parse(text);
  for (const processEvent of chain) event = processEvent(event);
  return JSON.stringify(event);
}));
