// Open OHIF pages in headless Chromium (playwright-core) and report what each shows.
//
//   node inspect_viewer.mjs SPEC.json   ->  JSON on stdout (one object per page)
//
// SPEC: {chromium, playwright (path of playwright-core), outDir, timeoutMs,
//        pages: [{name, url, waitFor: "annotation"|"segmentation"|"image", focusSop?}]}
// Each page is a fresh browser context (OHIF 3.13's SR loader can trip over a SEG loaded
// earlier in the same page). This script only collects facts (DOM text, cornerstone
// annotation and segmentation state, viewport image, screenshot); the pytest side judges.

import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = await import(pathToFileURL(path.join(spec.playwright, 'index.mjs')).href);
const ERROR_TEXT = /Something went wrong|One or more of the requested studies are not available/;

// Runs in the page: the state the test looks at.
function collect({ focusSop }) {
  const cs = window.cornerstone;
  const tools = window.cornerstoneTools;
  const out = { ready: Boolean(cs && tools), viewports: [], annotations: [], segmentations: [] };
  if (!out.ready) return out;
  for (const el of cs.getEnabledElements()) {
    const vp = el.viewport;
    const ids = vp.getImageIds ? vp.getImageIds() : [];
    const imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null;
    const image = imageId ? cs.cache.getImage(imageId) : null;
    out.viewports.push({
      id: el.viewportId, type: vp.type, imageId, index: vp.getCurrentImageIdIndex?.(), count: ids.length,
      imageLoaded: Boolean(image), color: image ? Boolean(image.color || image.rgba) : null,
      rows: image?.rows ?? null, columns: image?.columns ?? null,
    });
  }
  for (const a of tools.annotation.state.getAllAnnotations()) {
    const polyline = a.data?.renderableData?.POLYLINE?.[0] || [];
    out.annotations.push({
      toolName: a.metadata?.toolName, uid: a.annotationUID, label: a.data?.label ?? null,
      labels: (a.data?.labels || []).map(l => ({ label: String(l.label), value: String(l.value) })),
      referencedImageId: a.metadata?.referencedImageId ?? null, graphicType: a.metadata?.graphicType ?? null,
      points: polyline.length, isPreview: Boolean(a.isPreview),
    });
  }
  for (const s of tools.segmentation.state.getSegmentations()) {
    const lm = s.representationData?.Labelmap;
    const seg = {
      id: s.segmentationId,
      segments: Object.entries(s.segments || {}).map(([k, v]) => ({ index: Number(k), label: v.label })),
      focus: null,
    };
    if (lm && focusSop) {
      // label -> segment index per labelmap layer; count and centroid per segment on the
      // labelmap image(s) derived from the focused CT instance
      const labelToSegment = {};
      for (const [id, layer] of Object.entries(lm.labelmaps || {})) labelToSegment[id] = layer.labelToSegmentIndex || {};
      const stats = {};
      let images = 0;
      for (const id of lm.imageIds || []) {
        const img = cs.cache.getImage(id);
        if (!img || !String(img.referencedImageId || '').includes(`/instances/${focusSop}/`)) continue;
        images += 1;
        const layer = Object.keys(labelToSegment).find(k => (lm.labelmaps[k].imageIds || []).includes(id));
        const map = layer ? labelToSegment[layer] : {};
        const data = img.getPixelData();
        for (let i = 0; i < data.length; i++) {
          const v = data[i];
          if (!v) continue;
          const segment = map[v] ?? v;
          const st = (stats[segment] = stats[segment] || { count: 0, row: 0, col: 0 });
          st.count += 1; st.row += Math.floor(i / img.columns); st.col += i % img.columns;
        }
      }
      for (const st of Object.values(stats)) { st.row /= st.count; st.col /= st.count; }
      seg.focus = { sop: focusSop, images, stats };
    }
    out.segmentations.push(seg);
  }
  return out;
}

function satisfied(waitFor, state) {
  if (!state.ready) return false;
  const loaded = state.viewports.some(v => v.imageId && v.imageLoaded);
  if (waitFor === 'annotation') return loaded && state.annotations.some(a => a.toolName === 'DICOMSRDisplay');
  if (waitFor === 'segmentation') return loaded && state.segmentations.length > 0;
  return loaded;
}

const browser = await chromium.launch({
  executablePath: spec.chromium, headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--use-gl=swiftshader', '--enable-unsafe-swiftshader',
         '--ignore-gpu-blocklist'],
});
const results = [];
try {
  for (const p of spec.pages) {
    const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
    const page = await context.newPage();
    const res = { name: p.name, url: p.url, pageErrors: [], consoleErrors: [], timedOut: false };
    page.on('pageerror', e => res.pageErrors.push(String(e.message).slice(0, 500)));
    page.on('console', m => {
      const text = m.text();
      if (m.type() === 'error' || /Error Boundary|TypeError/.test(text)) res.consoleErrors.push(text.slice(0, 500));
    });
    const started = Date.now();
    await page.goto(p.url, { waitUntil: 'domcontentloaded', timeout: spec.timeoutMs });
    let state = null;
    let body = '';
    for (;;) {
      const skip = page.getByText('Skip all', { exact: true });  // the first-visit tour
      if (await skip.count()) await skip.first().click().catch(() => {});
      state = await page.evaluate(collect, { focusSop: null });
      body = await page.innerText('body');
      if (ERROR_TEXT.test(body) || satisfied(p.waitFor, state)) break;
      if (Date.now() - started > spec.timeoutMs) { res.timedOut = true; break; }
      await page.waitForTimeout(500);
    }
    if (p.focusSop && !res.timedOut) {
      // show the focused CT instance, as a reader scrolling to the lesion would
      await page.evaluate(sop => {
        const vp = window.cornerstone.getEnabledElements()[0].viewport;
        const index = vp.getImageIds().findIndex(id => id.includes(`/instances/${sop}/`));
        if (index >= 0) return vp.setImageIdIndex(index);
      }, p.focusSop);
    }
    await page.waitForTimeout(2000);  // let the last render and any late error toast land
    state = await page.evaluate(collect, { focusSop: p.focusSop || null });
    body = await page.innerText('body');
    res.seconds = (Date.now() - started) / 1000;
    res.state = state;
    res.bodyText = body.slice(0, 4000);
    res.svgTexts = await page.locator('svg text').allTextContents().catch(() => []);
    res.screenshot = path.join(spec.outDir, `${p.name}.png`);
    await page.screenshot({ path: res.screenshot });
    results.push(res);
    await context.close();
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(results));
