// A hostile web page open in the operator's browser (Debian's chromium), against the
// all-in-one fleet on loopback. The page, on another site (http://evil.example, mapped to
// 127.0.0.1 by chromium's resolver rules), tries what any page can: an <img> on a
// control route, a cross-site form POST, a no-cors fetch, a websocket to the broker, and
// DNS rebinding (its own name now resolving to the gateway). None of it may publish a
// command. SUB is the file a `mosquitto_sub -v -t 'fleet/#'` writes; BASE the gateway.
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { launchChromium } from "./chromium.mjs";

const base = new URL(process.env.BASE ?? "http://127.0.0.1:8080");
const wsPort = process.env.WS_PORT ?? "8083";
const subFile = process.env.SUB;
const artifacts = process.env.ART ?? ".";

const drives = () =>
  readFileSync(subFile, "utf8").split("\n").filter((l) => /^fleet\/[^/]+\/cmd\/drive /.test(l)).length;

const page = `<!doctype html><title>totally harmless</title>
<iframe name="sink" style="display:none"></iframe>
<img src="http://127.0.0.1:${base.port}/forward">
<img src="http://127.0.0.1:${base.port}/north">
<form id="f" method="POST" target="sink" enctype="text/plain"
      action="http://127.0.0.1:${base.port}/api/robots/linus/commands/drive">
  <input name='{"direction":"forward","x":"' value='"}'>
</form>
<script>
  window.results = {};
  document.getElementById("f").submit();
  fetch("http://127.0.0.1:${base.port}/api/robots/torvalds/commands/drive",
        { method: "POST", mode: "no-cors", body: "forward" }).catch(() => {});
  const ws = new WebSocket("ws://127.0.0.1:${wsPort}/mqtt", "mqtt");
  ws.onopen = () => { window.results.ws = "open"; };
  ws.onerror = () => { window.results.ws = "refused"; };
</script>`;

const server = createServer((_, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end(page);
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const pagePort = server.address().port;

const browser = await launchChromium(["--host-resolver-rules=MAP evil.example 127.0.0.1"]);
let failed = false;
const expect = (ok, what) => {
  console.log(`${ok ? "ok  " : "FAIL"} hostile page: ${what}`);
  failed ||= !ok;
};
try {
  const before = drives();
  const tab = await browser.newPage();
  await tab.goto(`http://evil.example:${pagePort}/`);
  await tab.waitForFunction(() => window.results.ws !== undefined, null, { timeout: 10000 });
  const ws = await tab.evaluate(() => window.results.ws);
  expect(ws === "refused", `its websocket to the broker is refused (${ws})`);
  await tab.waitForTimeout(2000);
  await tab.screenshot({ path: `${artifacts}/hostile-page.png` });

  // DNS rebinding: the page's own host name now points at the gateway.
  const rebound = await browser.newPage();
  const answer = await rebound.goto(`http://evil.example:${base.port}/`);
  expect(answer?.status() === 421, `the gateway refuses a foreign Host name (HTTP ${answer?.status()})`);
  const status = await rebound.evaluate(() =>
    fetch("/api/robots/linus/commands/drive", { method: "POST", body: "forward" }).then((r) => r.status));
  expect(status === 421, `a same-origin fetch after rebinding is refused (HTTP ${status})`);

  await rebound.waitForTimeout(1000);
  const after = drives();
  expect(after === before, `no drive command was published (${after - before} were)`);
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);
