// The three transformations of the peers benchmark, written as JavaScript
// plugin servers run them: each plugin is a script defining
// `processEvent(event)` that changes the event in place and returns it.
// They do what Sluice's pii-scrubber, property-renamer and url-parser do
// with the benchmark's configs. Sandboxes have no `URL` class (isolated-vm
// has only V8 itself), so the URL is split by hand.

const piiScrubber = `
const EMAIL = /[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}/g;
const PHONE = /\\+?\\d[\\d ().-]{7,}\\d/g;
function scrub(value) {
  if (typeof value === 'string') {
    return value.replace(EMAIL, '[redacted]').replace(PHONE, '[redacted]');
  }
  if (Array.isArray(value)) return value.map(scrub);
  if (value !== null && typeof value === 'object') {
    for (const key of Object.keys(value)) value[key] = scrub(value[key]);
  }
  return value;
}
function processEvent(event) {
  delete event.properties.phone;
  scrub(event.properties);
  return event;
}
`;

const propertyRenamer = `
const RENAMES = [['plan', 'subscription_plan'], ['$browser', 'browser'], ['$os', 'os']];
function rename(object) {
  for (const [from, to] of RENAMES) {
    if (from in object) {
      object[to] = object[from];
      delete object[from];
    }
  }
}
function processEvent(event) {
  const p = event.properties;
  rename(p);
  if (p.$set) rename(p.$set);
  if (p.$set_once) rename(p.$set_once);
  return event;
}
`;

const urlParser = `
const UTM = ['utm_source', 'utm_medium', 'utm_campaign', 'utm_term', 'utm_content'];
const URL_PARTS = /^[a-z][a-z0-9+.-]*:\\/\\/([^/?#]*)([^?#]*)(?:\\?([^#]*))?/i;
function decode(text) {
  try { return decodeURIComponent(text.replace(/\\+/g, ' ')); } catch (e) { return text; }
}
function processEvent(event) {
  const p = event.properties;
  const raw = p.$current_url;
  if (typeof raw !== 'string') return event;
  const parts = URL_PARTS.exec(raw.trim());
  if (!parts) return event;
  const host = parts[1].replace(/^.*@/, '').replace(/:\\d+$/, '').toLowerCase();
  if (host && !('url_host' in p)) p.url_host = host;
  if (!('url_path' in p)) p.url_path = parts[2] || '/';
  for (const pair of (parts[3] || '').split('&')) {
    const at = pair.indexOf('=');
    const key = decode(at < 0 ? pair : pair.slice(0, at));
    if (UTM.includes(key) && !(key in p)) p[key] = decode(at < 0 ? '' : pair.slice(at + 1));
  }
  return event;
}
`;

module.exports = { plugins: [piiScrubber, propertyRenamer, urlParser] };
