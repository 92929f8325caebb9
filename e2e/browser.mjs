// Drives the fleet's web page in Debian's chromium: hold a D-pad button and the simulated
// robot moves (and keeps moving past the dead-man time while held); release and it stops.
// BASE is the gateway's URL; a screenshot goes to ART/ui.png.
import { launchChromium } from "./chromium.mjs";

const base = process.env.BASE ?? "http://127.0.0.1:8080";
const artifacts = process.env.ART ?? ".";
const HOLD_LONGER_THAN_DEAD_MAN_MS = 1600;

const browser = await launchChromium();

const motionOf = (page, robot) => page.textContent(`[data-robot=${robot}] .motion`);
const waitForMotion = (page, robot, motion) =>
  page.waitForFunction(
    ([r, m]) => document.querySelector(`[data-robot=${r}] .motion`)?.textContent === m,
    [robot, motion],
    { timeout: 5000 },
  );

// The overview's tile selects a robot; the robot view (#view) has its D-pad.
async function selectRobot(page, robot) {
  await page.click(`.tile[data-robot=${robot}]`);
  await page.waitForSelector(`#view[data-robot=${robot}]`, { timeout: 5000 });
}

async function holdButton(page, robot, direction, expected) {
  await selectRobot(page, robot);
  const button = page.locator(`#view[data-robot=${robot}] [data-direction=${direction}]`);
  const box = await button.boundingBox();
  if (!box) throw new Error(`no ${direction} button for ${robot}`);
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  await waitForMotion(page, robot, expected);
  await page.waitForTimeout(HOLD_LONGER_THAN_DEAD_MAN_MS);
  const held = await motionOf(page, robot);
  if (held !== expected) throw new Error(`${robot} stopped while the button was held (${held})`);
  await page.screenshot({ path: `${artifacts}/ui-holding-${robot}.png`, fullPage: true });
  await page.mouse.up();
  await waitForMotion(page, robot, "stop");
  console.log(`browser: ${robot} ${direction} -> ${expected} while held, stop on release`);
}

let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.on("console", (msg) => console.log(`page console: ${msg.text()}`));
  page.on("pageerror", (err) => { console.error(`page error: ${err}`); exitCode = 1; });
  await page.goto(base);
  for (const robot of ["linus", "torvalds"]) {
    await page.waitForSelector(`[data-robot=${robot}] .badge.online`, { timeout: 10000 });
  }
  await holdButton(page, "linus", "forward", "forward");
  await holdButton(page, "torvalds", "left", "left");

  // Leaving the button while pressed also stops the robot.
  await selectRobot(page, "linus");
  const button = page.locator("#view[data-robot=linus] [data-direction=right]");
  await button.hover();
  await page.mouse.down();
  await waitForMotion(page, "linus", "right");
  await page.mouse.move(5, 5);
  await waitForMotion(page, "linus", "stop");
  await page.mouse.up();
  console.log("browser: leaving a held button stops the robot");

  // Sliders: servo 1 to 45° with a live readout, then the 30 % speed preset.
  await page.locator("[data-robot=linus] [data-servo='1']").fill("45");
  await page.waitForFunction(() => document.querySelector("[data-robot=linus] .servo-controls output")?.textContent === "45°");
  await page.waitForFunction(() => document.querySelector("[data-robot=linus] dd.servos")?.textContent.startsWith("45°"), null, { timeout: 5000 });
  await page.click("[data-robot=linus] [data-speed-preset='30']");
  await page.waitForFunction(() => document.querySelector("[data-robot=linus] dd.motors")?.textContent === "stopped @3, stopped @3", null, { timeout: 5000 });
  if (!(await page.locator("#view[data-robot=linus] .servo-controls").isVisible())) throw new Error("linus's servo sliders are hidden");
  await selectRobot(page, "torvalds");
  if (!(await page.locator("#view[data-robot=torvalds] .servo-controls").isHidden())) throw new Error("torvalds has no servos, yet the page shows servo sliders");
  if (!(await page.locator("#view[data-robot=torvalds] .speed-controls").isHidden())) throw new Error("torvalds has no speed control, yet the page shows speed sliders");
  console.log("browser: servo slider and speed preset reach linus");

  // Keyboard: select torvalds, hold the up arrow, release; D; space stops a long drive.
  await page.click(".tile[data-robot=torvalds] h2");
  await page.keyboard.down("ArrowUp");
  await waitForMotion(page, "torvalds", "forward");
  await page.waitForTimeout(HOLD_LONGER_THAN_DEAD_MAN_MS);
  if ((await motionOf(page, "torvalds")) !== "forward") throw new Error("torvalds stopped while the key was held");
  await page.keyboard.up("ArrowUp");
  await waitForMotion(page, "torvalds", "stop");
  await page.keyboard.down("d");
  await waitForMotion(page, "torvalds", "right");
  await page.keyboard.up("d");
  await waitForMotion(page, "torvalds", "stop");
  await page.evaluate(() => fetch("/api/robots/torvalds/commands/drive", { method: "POST", body: '{"direction":"backward","hold_ms":5000}' }));
  await waitForMotion(page, "torvalds", "backward");
  await page.keyboard.press("Space");
  await waitForMotion(page, "torvalds", "stop");
  console.log("browser: keyboard drives the selected robot; space stops it");

  await page.screenshot({ path: `${artifacts}/ui.png`, fullPage: true });
} catch (error) {
  console.error(`browser: ${error.stack ?? error}`);
  exitCode = 1;
} finally {
  await browser.close();
}
process.exit(exitCode);
