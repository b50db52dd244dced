// The administrator's web app in headless Chromium (playwright-core), as a person uses it.
//
//   node admin_flow.mjs SPEC.json  ->  JSON facts on stdout
//
// SPEC: {chromium, playwright, base, outDir, admin: [name, pw], viewer: [name, pw], jobId,
//        archive: {port}, mrFile, timeoutMs}
// Only collects facts (texts, states, screenshots); the pytest side judges.

import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = await import(pathToFileURL(path.join(spec.playwright, 'index.mjs')).href);
const facts = { steps: [] };
const shot = async (page, name) => page.screenshot({ path: path.join(spec.outDir, `${name}.png`), fullPage: true });
const flash = async (page) => (await page.locator('.flash').allTextContents()).join(' | ');

async function login(context, [name, pw]) {
  const page = await context.newPage();
  page.setDefaultTimeout(spec.timeoutMs);
  await page.goto(spec.base + '/');
  facts.steps.push(`login page for ${name}: ${page.url()}`);
  await page.fill('input[name=name]', name);
  await page.fill('input[name=password]', pw);
  await Promise.all([page.waitForNavigation(), page.click('button:has-text("Log in")')]);
  return page;
}

const browser = await chromium.launch({ executablePath: spec.chromium, args: ['--no-sandbox'] });
try {
  // -- the admin -------------------------------------------------------------------------
  const admin = await browser.newContext({ viewport: { width: 1300, height: 1000 } });
  let page = await login(admin, spec.admin);
  facts.dashboard = await page.textContent('main');
  facts.whoami = await page.textContent('header .who');
  await shot(page, '01-dashboard');

  await page.goto(`${spec.base}/jobs/${spec.jobId}`);
  facts.jobPage = await page.textContent('main');
  facts.previewWidth = await page.locator('img.preview').first().evaluate(
    (img) => new Promise((resolve) => (img.complete ? resolve(img.naturalWidth) : img.addEventListener('load', () => resolve(img.naturalWidth)))));
  await shot(page, '02-job');

  // re-run: a new job, which completes again
  await Promise.all([page.waitForNavigation(), page.click('button[value=rerun]')]);
  facts.rerunUrl = page.url();
  facts.rerunFlash = await flash(page);
  const deadline = Date.now() + spec.timeoutMs * 3;
  let state = '';
  while (Date.now() < deadline) {
    await page.reload();
    state = (await page.textContent('h1')) || '';
    if (/done|failed|dead/.test(state)) break;
    await page.waitForTimeout(2000);
  }
  facts.rerunState = state;
  await shot(page, '03-rerun-done');

  // configuration: add a destination, test it, write a rule, try it, save it
  await page.goto(`${spec.base}/config`);
  const dests = await page.inputValue('#text-destinations');
  await page.fill('#text-destinations', dests +
    `- {name: archive, kind: dicom, host: 127.0.0.1, port: ${spec.archive.port}, ae_title: STORESCP}\n`);
  await Promise.all([page.waitForNavigation(), page.click('#form-destinations button[value=save]')]);
  facts.destinationSaved = await flash(page);
  await Promise.all([page.waitForNavigation(), page.click('form[action="/api/destinations/archive/test"] button')]);
  facts.destinationTest = await flash(page);
  await shot(page, '04-destination-tested');

  const rules = await page.inputValue('#text-rules');
  const mrRule = '- name: mr-archive\n  when:\n  - {tag: Modality, equals: MR}\n  action: forward\n  destinations: [archive]\n';
  await page.fill('#text-rules', rules + mrRule);
  await page.setInputFiles('#form-rules input[type=file]', spec.mrFile);
  await page.fill('#form-rules input[name=calling_ae]', 'STORESCU');
  await Promise.all([page.waitForNavigation(), page.click('#form-rules button:has-text("Test")')]);
  facts.ruleTest = (await page.locator('#tested').textContent()) || '';
  facts.rulesAfterTest = await page.inputValue('#text-rules');
  await shot(page, '05-rule-tested');
  await Promise.all([page.waitForNavigation(), page.click('#form-rules button[value=save]')]);
  facts.ruleSaved = await flash(page);
  await shot(page, '06-rule-saved');

  await page.goto(`${spec.base}/audit`);
  facts.audit = await page.textContent('main');
  await shot(page, '07-audit');

  // -- a viewer ----------------------------------------------------------------------------
  const viewer = await browser.newContext({ viewport: { width: 1300, height: 1000 } });
  page = await login(viewer, spec.viewer);
  await page.goto(`${spec.base}/config`);
  facts.viewerSaveButtons = await page.locator('button[value=save]').count();
  facts.viewerReadonly = await page.locator('#text-rules').getAttribute('readonly');
  await page.goto(`${spec.base}/jobs/${spec.jobId}`);
  facts.viewerRerunButtons = await page.locator('button[value=rerun]').count();
  // even a hand-made request is refused
  facts.viewerForcedSave = await page.evaluate(async () => {
    const csrf = document.querySelector('input[name=csrf]').value;
    const r = await fetch('/api/config/rules', { method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
                                                 body: new URLSearchParams({ csrf, text: '', do: 'save' }) });
    return r.status;
  });
  await shot(page, '08-viewer-job');
} catch (err) {
  facts.error = String(err && err.stack || err);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(facts));
