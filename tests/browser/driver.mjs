// A real headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) that the
// Python tests command over stdin/stdout, one JSON object per line each way:
//   {"id": 1, "cmd": "goto", "url": "...", "width": 1200, "height": 1600}
//   -> {"id": 1, "ok": true, "value": ...} or {"id": 1, "ok": false, "error": "..."}
// Commands: goto, eval (expr: a JS expression or function source), click (selector),
// screenshot (path, full), download (selector, path), viewport (width, height), errors, close.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const profile = mkdtempSync(join(tmpdir(), "wattflow-chromium-"));
// Without these flags Chromium reaches out to the network (updates, sync, field trials).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1200, height: 1600 },
  acceptDownloads: true,
  timezoneId: process.env.BROWSER_TZ || undefined,
});
const page = context.pages()[0] || await context.newPage();
const errors = [];
page.on("pageerror", (err) => errors.push(`pageerror: ${err.message}`));
page.on("console", (msg) => { if (msg.type() === "error") errors.push(`console: ${msg.text()}`); });

async function run(m) {
  switch (m.cmd) {
    case "goto":
      if (m.width) await page.setViewportSize({ width: m.width, height: m.height });
      await page.goto(m.url, { waitUntil: "load" });
      return null;
    case "reload":
      await page.reload({ waitUntil: "load" });
      return null;
    case "eval":
      return await page.evaluate(m.expr);
    case "click":
      await page.click(m.selector);
      return null;
    case "viewport":
      await page.setViewportSize({ width: m.width, height: m.height });
      return null;
    case "screenshot":
      await page.screenshot({ path: m.path, fullPage: !!m.full });
      return m.path;
    case "download": {
      const [dl] = await Promise.all([page.waitForEvent("download"), page.click(m.selector)]);
      await dl.saveAs(m.path);
      return { path: m.path, name: dl.suggestedFilename(), url: dl.url() };
    }
    case "errors":
      return errors.splice(0);
    case "close":
      return null;
    default:
      throw new Error(`unknown command ${m.cmd}`);
  }
}

const send = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
send({ id: 0, ok: true, value: "ready" });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const m = JSON.parse(line);
  try {
    send({ id: m.id, ok: true, value: await run(m) });
  } catch (err) {
    send({ id: m.id, ok: false, error: String(err && err.stack || err) });
  }
  if (m.cmd === "close") break;
}
await context.close();
rmSync(profile, { recursive: true, force: true });
process.exit(0);
