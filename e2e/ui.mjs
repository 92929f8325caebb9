// The fleet's web UI in Debian's chromium, at a desktop (1280 px) and a phone (390 px,
// touch) viewport: overview, search/filter, natural sort (SIMS=1: sim-1..sim-100 are up
// too), colours, offline robots greyed and disabled (MQTT_PORT: published with
// mosquitto_pub, then restored), latency, error toasts, the D-pad lighting up whatever
// drove the robot, stop on blur / hidden tab / lost link, a (fake) gamepad with deadman
// and analog speed, the touch joystick, and the pinned e-stop at the bottom of the phone
// page, the latched e-stop (latched and released from the page). BASE is the gateway's
// URL; screenshots go to ART/ui-*.png. Leaves both robots online, stopped, linus at full
// speed, the latch released.
import { execFileSync } from "node:child_process";
import { createServer, connect } from "node:net";
import { launchChromium } from "./chromium.mjs";

const base = process.env.BASE ?? "http://127.0.0.1:8080";
const artifacts = process.env.ART ?? ".";
const sims = process.env.SIMS === "1";
const mqttPort = process.env.MQTT_PORT;
const PAST_DEAD_MAN_MS = 1600;

const browser = await launchChromium();

const ok = (what) => console.log(`ui: ${what}`);
const fail = (what) => { throw new Error(what); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The gateway, as a script sees it (no Origin: another client than the page).
async function robot(id) {
  const res = await fetch(`${base}/api/robots/${id}`);
  return res.json();
}
async function drive(id, direction, holdMs) {
  const res = await fetch(`${base}/api/robots/${id}/commands/drive?wait=true`, {
    method: "POST", body: JSON.stringify({ direction, hold_ms: holdMs }),
  });
  if (res.status !== 200) fail(`drive ${id}: HTTP ${res.status}`);
}
async function stopAll() {
  await fetch(`${base}/api/fleet/stop`, { method: "POST" });
}

const motionIn = (page, sel) => page.evaluate((s) => document.querySelector(s)?.textContent, sel);
const waitMotion = (page, id, motion, timeout = 5000) =>
  page.waitForFunction(
    ([r, m]) => document.querySelector(`.tile[data-robot="${r}"] .motion`)?.textContent === m,
    [id, motion], { timeout },
  ).catch(() => fail(`${id} did not reach motion ${motion}`));
async function staysStopped(page, id, ms, why) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const state = (await robot(id)).state;
    if (state.motion !== "stop") fail(`${id} moves (${state.motion}) ${why}`);
    await sleep(150);
  }
}
async function select(page, id) {
  await page.click(`.tile[data-robot="${id}"]`);
  await page.waitForSelector(`#view[data-robot="${id}"]`, { timeout: 5000 });
}
function watchErrors(page) {
  page.on("pageerror", (err) => { console.error(`page error: ${err}`); exitCode = 1; });
}

// A fake standard-mapping gamepad; the test sets window.__pad's axes and buttons.
const FAKE_PAD = () => {
  const buttons = Array.from({ length: 17 }, () => ({ pressed: false, touched: false, value: 0 }));
  window.__pad = { axes: [0, 0, 0, 0], buttons };
  window.__setPad = (axes, pressedButtons) => {
    window.__pad.axes = axes;
    window.__pad.buttons.forEach((b, i) => { b.pressed = pressedButtons.includes(i); b.value = b.pressed ? 1 : 0; });
  };
  navigator.getGamepads = () => [{
    id: "fake pad (STANDARD GAMEPAD)", index: 0, connected: true, mapping: "standard",
    timestamp: performance.now(), axes: [...window.__pad.axes], buttons: window.__pad.buttons.map((b) => ({ ...b })),
  }];
};
// Overrides document.visibilityState / hidden and fires visibilitychange.
const setVisibility = (page, state) => page.evaluate((s) => {
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => s });
  Object.defineProperty(document, "hidden", { configurable: true, get: () => s === "hidden" });
  document.dispatchEvent(new Event("visibilitychange"));
}, state);

// A TCP proxy in front of the gateway whose link can be cut (open connections dropped,
// new ones refused) and restored.
async function linkProxy(target) {
  const sockets = new Set();
  let down = false;
  const server = createServer((client) => {
    if (down) { client.destroy(); return; }
    const upstream = connect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) { sockets.add(s); s.on("close", () => sockets.delete(s)); s.on("error", () => {}); }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    cut() { down = true; for (const s of sockets) s.destroy(); },
    restore() { down = false; },
    close() { server.close(); for (const s of sockets) s.destroy(); },
  };
}

let exitCode = 0;
try {
  // ---------------------------------------------------------------- desktop, 1280 px
  const desktop = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await desktop.addInitScript(FAKE_PAD);
  const page = await desktop.newPage();
  watchErrors(page);
  await page.goto(base);
  for (const id of ["linus", "torvalds"]) {
    await page.waitForSelector(`.tile[data-robot=${id}] .badge.online`, { timeout: 10000 });
  }
  if (sims) await page.waitForSelector(`.tile[data-robot=sim-100]`, { timeout: 20000 });
  await page.waitForFunction(() => /^Fleet \(\d+\)$/.test(document.title));
  const title = await page.title();
  const heading = await page.textContent("h1");
  if (/dual/i.test(title + heading)) fail(`title still says Dual Robot: ${title} / ${heading}`);
  const total = await page.locator(".tile").count();
  if (title !== `Fleet (${total})` || !heading.includes(`${total} robot`)) fail(`title ${title} / heading ${heading} for ${total} robots`);
  ok(`title "${title}", heading "${heading.trim()}"`);

  // The overview fills the width: several tiles a row, not fixed 320 px cards.
  const boxes = await page.$$eval(".tile", (tiles) => tiles.slice(0, 12).map((t) => t.getBoundingClientRect().toJSON()));
  const firstRow = boxes.filter((b) => Math.abs(b.y - boxes[0].y) < 2);
  const grid = await page.$eval("#robots", (m) => m.getBoundingClientRect().width);
  if (boxes[1].y !== boxes[0].y) fail("the first two tiles are not side by side");
  if (sims && firstRow.length * boxes[0].width < grid * 0.85) fail(`a row of ${firstRow.length} tiles fills ${firstRow.length * boxes[0].width} of ${grid} px`);
  ok(`desktop overview: ${total} tiles, ${sims ? firstRow.length + " a row filling the width" : "side by side"}`);

  // Colours: the e-stop is red and nothing else is; no identity colour is red.
  const reds = await page.evaluate(() => {
    const red = (c) => {
      const m = c.match(/rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)/);
      if (!m || (m[4] !== undefined && Number(m[4]) < 0.2)) return false;
      const [r, g, b] = [Number(m[1]), Number(m[2]), Number(m[3])];
      return r > 150 && g < 110 && b < 110 && r - Math.max(g, b) > 90;
    };
    const found = [];
    const estop = document.getElementById("estop");
    if (!red(getComputedStyle(estop).backgroundColor)) found.push("the e-stop is not red");
    for (const el of document.querySelectorAll("body *")) {
      if (el === estop || estop.contains(el)) continue;
      const s = getComputedStyle(el);
      for (const prop of ["color", "backgroundColor", "borderLeftColor", "borderTopColor", "outlineColor"]) {
        if (red(s[prop])) found.push(`${el.tagName.toLowerCase()}.${el.className} ${prop} ${s[prop]}`);
      }
      if (red(s.getPropertyValue("--accent").trim().replace(/^#(..)(..)(..)$/, (_, r, g, b) => `rgb(${parseInt(r, 16)}, ${parseInt(g, 16)}, ${parseInt(b, 16)})`))) {
        found.push(`${el.dataset.robot} has a red identity colour`);
      }
    }
    return found;
  });
  if (reds.length) fail(`red besides the e-stop: ${reds.slice(0, 5).join("; ")}`);
  ok("the e-stop is the only red thing on the page");

  // Search and filter.
  await page.fill("#search", "torv");
  await page.waitForFunction(() => [...document.querySelectorAll(".tile")].filter((t) => !t.hidden).map((t) => t.dataset.robot).join() === "torvalds");
  await page.fill("#search", "");
  await page.selectOption("#filter", "moving");
  await page.waitForFunction(() => [...document.querySelectorAll(".tile")].every((t) => t.hidden));
  await drive("torvalds", "left", 2000);
  await page.waitForFunction(() => [...document.querySelectorAll(".tile")].filter((t) => !t.hidden).map((t) => t.dataset.robot).join() === "torvalds");
  await stopAll();
  await page.waitForFunction(() => [...document.querySelectorAll(".tile")].every((t) => t.hidden));
  await page.selectOption("#filter", "all");
  await page.waitForFunction((n) => [...document.querySelectorAll(".tile")].filter((t) => !t.hidden).length === n, total);
  ok("search (torv -> torvalds) and the moving filter narrow the overview");

  if (sims) {
    const order = await page.$$eval(".tile", (tiles) => tiles.map((t) => t.dataset.robot).filter((id) => id.startsWith("sim-")));
    const expected = Array.from({ length: 100 }, (_, i) => `sim-${i + 1}`);
    if (order.join() !== expected.join()) fail(`sims not in natural order: ${order.slice(0, 12).join(", ")}…`);
    await page.fill("#search", "sim-10");
    await page.waitForFunction(() => [...document.querySelectorAll(".tile")].filter((t) => !t.hidden).map((t) => t.dataset.robot).join() === "sim-10,sim-100");
    await page.waitForFunction(() => document.getElementById("shown").textContent.startsWith("2 of "));
    await page.screenshot({ path: `${artifacts}/ui-desktop-search.png` });
    await page.fill("#search", "");
    ok("natural sort: sim-1, sim-2 … sim-10 … sim-100; search sim-10 -> sim-10, sim-100");
  }
  await page.screenshot({ path: `${artifacts}/ui-desktop.png`, fullPage: true });

  // Desktop: the e-stop stays on screen at the bottom of the page and covers no control.
  await select(page, "linus");
  await page.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  await sleep(200);
  const covered = await page.evaluate(() => {
    const estop = document.getElementById("estop").getBoundingClientRect();
    if (estop.top < 0 || estop.bottom > innerHeight) return ["the e-stop is off screen"];
    const hidden = [];
    for (const el of document.querySelectorAll("#view button, #view input, #search, #filter")) {
      const r = el.getBoundingClientRect();
      if (!r.width || r.bottom < 0 || r.top > innerHeight) continue;
      const x = r.left + r.width / 2, y = r.top + r.height / 2;
      const top = document.elementFromPoint(x, y);
      if (top && top !== el && !el.contains(top)) hidden.push(`${el.tagName.toLowerCase()}${el.dataset.direction ? "[" + el.dataset.direction + "]" : ""} under ${top.id || top.className}`);
    }
    return hidden;
  });
  if (covered.length) fail(`desktop, scrolled to the bottom: ${covered.join("; ")}`);
  await page.screenshot({ path: `${artifacts}/ui-desktop-bottom.png` });
  await page.evaluate(() => window.scrollTo(0, 0));
  ok("desktop: STOP ALL on screen at the bottom of the page, covering none of the robot view's controls");

  // Latency: a command from the page shows its round trip.
  await select(page, "linus");
  await page.click("#view [data-speed-preset='100']");
  await page.waitForFunction(() => /^rtt \d+ ms/.test(document.getElementById("latency").textContent) && /^\d+ ms$/.test(document.querySelector("#view .rtt").textContent));
  ok(`round trip shown: "${await page.textContent("#latency")}", robot view rtt ${await page.textContent("#view .rtt")}`);

  // A command the robot refuses becomes a toast, not an alert().
  page.on("dialog", (d) => { exitCode = 1; console.error(`ui: unexpected dialog ${d.type()}: ${d.message()}`); d.dismiss(); });
  await page.evaluate(() => window.fleetUI.send("torvalds", "servo", { servo1: 10 }));
  await page.waitForSelector(".toast.error:has-text('not_supported')", { timeout: 5000 });
  await page.screenshot({ path: `${artifacts}/ui-desktop-toast.png` });
  ok(`a refused command shows a toast: "${(await page.textContent(".toast.error .msg")).trim()}"`);

  // The D-pad lights up whatever drove the robot: here another client.
  await drive("linus", "left", 1500);
  await page.waitForSelector("#view[data-robot=linus] [data-direction=left].lit", { timeout: 5000 });
  if (await page.locator("#view [data-direction].lit").count() !== 1) fail("more than one D-pad button lit");
  const by = await page.textContent("#view .driver");
  if (by !== "by another client") fail(`driver shown as "${by}"`);
  await stopAll();
  await page.waitForFunction(() => !document.querySelector("#view [data-direction].lit"));
  ok("the D-pad lights up for a drive from another client (left, 'by another client') and goes dark on stop");

  // Stop on blur while a D-pad button is held.
  const fwd = await page.locator("#view [data-direction=forward]").boundingBox();
  await page.mouse.move(fwd.x + fwd.width / 2, fwd.y + fwd.height / 2);
  await page.mouse.down();
  await waitMotion(page, "linus", "forward");
  if ((await page.textContent("#view .driver")) !== "by D-pad") fail("the robot view does not say the D-pad drives");
  await page.evaluate(() => window.dispatchEvent(new Event("blur")));
  await waitMotion(page, "linus", "stop", 2000);
  await staysStopped(page, "linus", PAST_DEAD_MAN_MS, "after blur while the button is still held");
  await page.mouse.up();
  ok("window blur while holding the D-pad stops linus (and it stays stopped while still held)");

  // Stop on a hidden tab while a key is held.
  await page.keyboard.down("ArrowUp");
  await waitMotion(page, "linus", "forward");
  await setVisibility(page, "hidden");
  await waitMotion(page, "linus", "stop", 2000);
  await staysStopped(page, "linus", PAST_DEAD_MAN_MS, "after the tab was hidden, key still held");
  await page.keyboard.up("ArrowUp");
  await setVisibility(page, "visible");
  ok("a hidden tab while holding a key stops linus");

  // Gamepad: the stick alone does nothing; deadman + stick drives, with speed from the stick.
  const padSpeed = async (want) => {
    for (let i = 0; i < 40; i++) {
      const s = (await robot("linus")).state;
      if (s.motion === "forward" && s.motors.every((m) => m.speed === want)) return;
      await sleep(100);
    }
    fail(`linus not forward at speed ${want}: ${JSON.stringify((await robot("linus")).state.motors)}`);
  };
  await page.waitForFunction(() => document.getElementById("pad").textContent === "gamepad ready");
  await page.evaluate(() => window.__setPad([0, -1, 0, 0], []));
  await staysStopped(page, "linus", 700, "with the stick pushed but no deadman");
  await page.evaluate(() => window.__setPad([0, -0.5, 0, 0], [4]));
  await padSpeed(5);
  if ((await page.textContent("#view .driver")) !== "by gamepad") fail("the robot view does not say the gamepad drives");
  await page.waitForSelector("#view [data-direction=forward].lit");
  await page.screenshot({ path: `${artifacts}/ui-desktop-gamepad.png` });
  await page.waitForTimeout(PAST_DEAD_MAN_MS);
  await padSpeed(5);
  await page.evaluate(() => window.__setPad([0, -1, 0, 0], [4]));
  await padSpeed(10);
  await page.evaluate(() => window.__setPad([0.9, 0.1, 0, 0], [4]));
  await waitMotion(page, "linus", "right");
  await page.evaluate(() => window.__setPad([0.9, 0.1, 0, 0], []));
  await waitMotion(page, "linus", "stop", 2000);
  await staysStopped(page, "linus", 600, "after the deadman was let go");
  ok("gamepad: no drive without the deadman; deadman + stick 50 % -> forward @5 past the dead-man, 100 % -> @10, right; deadman released -> stop");

  // Gamepad on torvalds (no speed control): drives without speed, no refusals.
  await select(page, "torvalds");
  await page.evaluate(() => window.__setPad([0, 0.6, 0, 0], [5]));
  await waitMotion(page, "torvalds", "backward");
  await page.evaluate(() => window.__setPad([0, 0, 0, 0], [5]));
  await waitMotion(page, "torvalds", "stop", 2000);
  if (await page.locator(".toast.error:has-text('torvalds: drive')").count()) fail("torvalds refused a gamepad drive");
  // Hidden tab while the gamepad drives: stop, and no driving again until the deadman is let go.
  await page.evaluate(() => window.__setPad([0, -1, 0, 0], [5]));
  await waitMotion(page, "torvalds", "forward");
  await setVisibility(page, "hidden");
  await waitMotion(page, "torvalds", "stop", 2000);
  await setVisibility(page, "visible");
  await staysStopped(page, "torvalds", 800, "after the tab came back with the deadman still held");
  await page.evaluate(() => window.__setPad([0, -1, 0, 0], []));
  await page.waitForTimeout(200);
  await page.evaluate(() => window.__setPad([0, -1, 0, 0], [5]));
  await waitMotion(page, "torvalds", "forward");
  await page.evaluate(() => window.__setPad([0, 0, 0, 0], []));
  await waitMotion(page, "torvalds", "stop", 2000);
  ok("gamepad on torvalds (no speed pins) drives; a hidden tab stops it and it waits for the deadman to be pressed again");

  // Lost link: the page talks through a proxy that then drops every connection and
  // refuses new ones; the live stream goes, the page stops refreshing its drive.
  const proxy = await linkProxy(new URL(base));
  const cut = await desktop.newPage();
  watchErrors(cut);
  await cut.goto(proxy.url);
  await cut.waitForSelector(".tile[data-robot=linus] .badge.online", { timeout: 10000 });
  await select(cut, "linus");
  const back = await cut.locator("#view [data-direction=backward]").boundingBox();
  await cut.mouse.move(back.x + back.width / 2, back.y + back.height / 2);
  await cut.mouse.down();
  await waitMotion(cut, "linus", "backward");
  proxy.cut();
  await cut.waitForFunction(() => document.getElementById("link").textContent.includes("unreachable"), null, { timeout: 5000 });
  await sleep(1500);   // the robot's dead-man ends the last drive that got through
  if ((await robot("linus")).state.motion !== "stop") fail("linus still moves after the page lost its link");
  if (await cut.locator("#view [data-direction=backward].active").count()) fail("the D-pad still shows a held button after the link was lost");
  proxy.restore();
  await cut.waitForFunction(() => document.getElementById("link").textContent === "broker connected", null, { timeout: 10000 });
  await staysStopped(cut, "linus", 800, "after the link came back, mouse still down");
  await cut.mouse.up();
  await cut.close();
  proxy.close();
  ok("a lost link to the gateway stops the drive (linus stops, stays stopped when the link returns)");

  // Offline robot: greyed, controls disabled, found by the offline filter.
  if (mqttPort) {
    const status = (value) => execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", mqttPort, "-r", "-q", "1", "-t", "fleet/torvalds/status", "-m", value]);
    status("offline");
    try {
      await page.waitForSelector(".tile.offline[data-robot=torvalds] .badge.offline", { timeout: 5000 });
      await select(page, "torvalds");
      if (!(await page.$eval("#view", (v) => v.querySelector(".drive-area").disabled && v.classList.contains("is-offline")))) fail("torvalds is offline, yet its controls are enabled");
      if (!(await page.locator("#view [data-direction=forward]").isDisabled())) fail("offline torvalds's D-pad is enabled");
      const opacity = await page.$eval(".tile[data-robot=torvalds]", (t) => Number(getComputedStyle(t).opacity));
      if (opacity > 0.7) fail(`offline tile not greyed (opacity ${opacity})`);
      await page.keyboard.down("ArrowUp");
      await staysStopped(page, "torvalds", 500, "after the up arrow while it is shown offline");
      await page.keyboard.up("ArrowUp");
      await page.waitForSelector(".toast.error:has-text('torvalds is offline')", { timeout: 2000 });
      await page.selectOption("#filter", "offline");
      // (Other robots may be offline too: stopped sims keep a retained offline.)
      await page.waitForFunction(() => {
        const shown = [...document.querySelectorAll(".tile")].filter((t) => !t.hidden);
        return shown.some((t) => t.dataset.robot === "torvalds") && shown.every((t) => t.classList.contains("offline"));
      });
      await page.screenshot({ path: `${artifacts}/ui-desktop-offline.png` });
      await page.selectOption("#filter", "all");
    } finally {
      status("online");
    }
    await page.waitForSelector(".tile[data-robot=torvalds] .badge.online", { timeout: 5000 });
    if (!(await page.locator("#view [data-direction=forward]").isEnabled())) fail("torvalds back online, its D-pad still disabled");
    ok("an offline robot is greyed, its controls disabled, the offline filter finds it; back online, enabled again");
  } else {
    console.log("ui: (skipped the offline check: no MQTT_PORT)");
  }

  // The latched e-stop: latched from the page, every robot engaged, the drive controls
  // off and a banner that says who; released from the banner, everything back.
  await select(page, "linus");
  await page.click("#latch-btn");
  await page.waitForSelector("#latch-banner:not([hidden])", { timeout: 5000 });
  for (const id of ["linus", "torvalds"]) {
    const until = Date.now() + 5000;
    while ((await robot(id)).state?.estop !== "engaged") {
      if (Date.now() > until) fail(`${id} does not say the latch is engaged`);
      await sleep(100);
    }
  }
  if (!(await page.locator("#view [data-direction=forward]").isDisabled())) fail("the D-pad is enabled while latched");
  const who = (await page.textContent("#latch-banner .who")).trim();
  if (!who.startsWith("by gateway")) fail(`the banner does not say who latched it: ${who}`);
  const latchedDrive = await fetch(`${base}/api/robots/linus/commands/drive`, { method: "POST", body: "forward" });
  if (latchedDrive.status !== 409) fail(`a drive while latched answered ${latchedDrive.status}, not 409`);
  await page.screenshot({ path: `${artifacts}/ui-desktop-latched.png` });
  await page.click("#latch-release");
  await page.waitForSelector("#latch-banner[hidden]", { state: "attached", timeout: 5000 });
  await page.waitForFunction(() => !document.querySelector("#view [data-direction=forward]").disabled, null, { timeout: 5000 });
  for (const id of ["linus", "torvalds"]) {
    const until = Date.now() + 5000;
    while ((await robot(id)).state?.estop !== "clear") {
      if (Date.now() > until) fail(`${id} does not say the latch is clear`);
      await sleep(100);
    }
  }
  ok(`latched from the page: both robots engaged, D-pad off, a drive answered 409, banner "${who}"; released from the banner`);
  await desktop.close();

  // ---------------------------------------------------------------- phone, 390 px, touch
  const phone = await browser.newContext({
    viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
  });
  const mobile = await phone.newPage();
  watchErrors(mobile);
  await mobile.goto(base);
  for (const id of ["linus", "torvalds"]) {
    await mobile.waitForSelector(`.tile[data-robot=${id}] .badge.online`, { timeout: 10000 });
  }
  const overflow = await mobile.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) fail(`the phone page is ${overflow} px wider than the screen`);
  await mobile.tap(".tile[data-robot=linus]");
  await mobile.waitForSelector("#view[data-robot=linus] .joystick:not([hidden])");
  await mobile.waitForTimeout(300);   // the tap scrolls the robot view into view
  await mobile.screenshot({ path: `${artifacts}/ui-phone.png` });

  // The joystick, with touch events: push up about 70 % -> forward at speed 7.
  const joy = await mobile.locator("#view .joystick").boundingBox();
  const cx = joy.x + joy.width / 2, cy = joy.y + joy.height / 2, radius = joy.width / 2;
  const cdp = await phone.newCDPSession(mobile);
  const touch = (type, x, y) => cdp.send("Input.dispatchTouchEvent", {
    type, touchPoints: type === "touchEnd" ? [] : [{ x, y, id: 1, radiusX: 5, radiusY: 5, force: 1 }],
  });
  await touch("touchStart", cx, cy);
  for (let step = 1; step <= 5; step++) { await touch("touchMove", cx, cy - radius * 0.7 * step / 5); await sleep(30); }
  await waitMotion(mobile, "linus", "forward");
  await mobile.screenshot({ path: `${artifacts}/ui-phone-joystick.png` });
  await mobile.waitForTimeout(PAST_DEAD_MAN_MS);
  const held = (await robot("linus")).state;
  if (held.motion !== "forward") fail(`linus stopped while the joystick was held (${held.motion})`);
  if (!held.motors.every((m) => m.speed === 7)) fail(`joystick at 70 % gave speeds ${JSON.stringify(held.motors)}`);
  if ((await mobile.textContent("#view .driver")) !== "by joystick") fail("the robot view does not say the joystick drives");
  await touch("touchMove", cx - radius * 0.8, cy);
  await waitMotion(mobile, "linus", "left");
  await touch("touchEnd");
  await waitMotion(mobile, "linus", "stop", 2000);
  ok("phone: the touch joystick drives linus forward @7 past the dead-man, then left; lifting the finger stops it");

  // The D-pad by touch too.
  const left = await mobile.locator("#view [data-direction=left]").boundingBox();
  await touch("touchStart", left.x + left.width / 2, left.y + left.height / 2);
  await waitMotion(mobile, "linus", "left");
  await touch("touchEnd");
  await waitMotion(mobile, "linus", "stop", 2000);
  ok("phone: touching the D-pad drives, lifting stops");

  // The e-stop stays on screen at the bottom of the page, and stops every robot.
  await mobile.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  await sleep(300);
  const estop = await mobile.locator("#estop").boundingBox();
  if (!estop || estop.y < 0 || estop.y + estop.height > 844 || estop.height < 40) fail(`the e-stop is off screen at the bottom: ${JSON.stringify(estop)}`);
  const onTop = await mobile.evaluate(([x, y]) => document.elementFromPoint(x, y)?.id, [estop.x + estop.width / 2, estop.y + estop.height / 2]);
  if (onTop !== "estop") fail(`something covers the e-stop: ${onTop}`);
  await drive("linus", "forward", 5000);
  await drive("torvalds", "right", 5000);
  await waitMotion(mobile, "torvalds", "right");
  await mobile.screenshot({ path: `${artifacts}/ui-phone-bottom.png` });
  const t0 = Date.now();
  await mobile.tap("#estop");
  await waitMotion(mobile, "linus", "stop", 2000);
  await waitMotion(mobile, "torvalds", "stop", 2000);
  const scrolled = await mobile.evaluate(() => window.scrollY);
  ok(`phone: STOP ALL pinned on screen after scrolling to the bottom (scrollY ${scrolled}); it stopped both robots in ${Date.now() - t0} ms`);
  await mobile.waitForSelector(".toast:has-text('STOP ALL sent')");
  await phone.close();

  // Optional: a gateway started with --api-token (TOKEN_BASE, TOKEN): the page asks for the
  // token in a form of its own (no prompt()), then drives.
  if (process.env.TOKEN_BASE && process.env.TOKEN) {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const tp = await ctx.newPage();
    watchErrors(tp);
    tp.on("dialog", (d) => { exitCode = 1; console.error(`ui: unexpected dialog ${d.type()}`); d.dismiss(); });
    await tp.goto(process.env.TOKEN_BASE);
    await tp.waitForSelector(".tile[data-robot=torvalds] .badge.online", { timeout: 10000 });
    await select(tp, "torvalds");
    const btn = tp.locator("#view [data-direction=forward]");
    await btn.hover();
    await tp.mouse.down();
    await tp.waitForSelector("#token-form:not([hidden])", { timeout: 5000 });
    await tp.mouse.up();
    await tp.waitForSelector(".toast.error:has-text('API token')");
    await tp.screenshot({ path: `${artifacts}/ui-desktop-token.png` });
    await tp.fill("#token-input", process.env.TOKEN);
    await tp.click("#token-form button[type=submit]");
    await tp.waitForSelector("#token-form", { state: "hidden" });
    await btn.hover();
    await tp.mouse.down();
    await waitMotion(tp, "torvalds", "forward");
    await tp.mouse.up();
    await waitMotion(tp, "torvalds", "stop");
    await ctx.close();
    ok("with --api-token: the page asks for the token in its own form, keeps it, then drives");
  }
} catch (error) {
  console.error(`ui: FAILED: ${error.stack ?? error}`);
  exitCode = 1;
} finally {
  await browser.close();
  // Leave the fleet as found: online, stopped, linus at full speed.
  if (mqttPort) {
    try { execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", mqttPort, "-r", "-q", "1", "-t", "fleet/torvalds/status", "-m", "online"]); } catch { exitCode = 1; }
  }
  await stopAll().catch(() => {});
  const speed = await fetch(`${base}/api/robots/linus/commands/speed?wait=true`, { method: "POST", body: '{"motor1":10,"motor2":10}' })
    .then((r) => r.json()).catch((e) => ({ error: String(e) }));
  if (speed.status !== "ok") { console.error(`ui: could not set linus back to full speed: ${JSON.stringify(speed)}`); exitCode = 1; }
}
process.exit(exitCode);
