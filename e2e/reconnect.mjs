// The gateway restarts under an open web page: the page's live stream reconnects by itself
// and shows new state again. RESTART is a shell command that restarts the gateway; BASE
// its URL; DRIVE a shell command that changes the robot's state after the restart.
import { execSync } from "node:child_process";
import { launchChromium } from "./chromium.mjs";

const base = process.env.BASE;
const robot = process.env.ROBOT ?? "linus";
const artifacts = process.env.ART ?? ".";

const browser = await launchChromium();
const linkIs = (page, text) =>
  page.waitForFunction((t) => document.getElementById("link")?.textContent === t, text, {
    timeout: 20000,
  });
try {
  const page = await browser.newPage();
  await page.goto(base);
  await linkIs(page, "broker connected");
  // Remember that the page saw the gateway go away, so "connected" below is a reconnect.
  await page.evaluate(() => {
    const link = document.getElementById("link");
    window.sawGatewayGone = false;
    new MutationObserver(() => {
      if (link.textContent.startsWith("gateway unreachable")) window.sawGatewayGone = true;
    }).observe(link, { childList: true, characterData: true, subtree: true });
  });
  execSync(process.env.RESTART, { stdio: "inherit" });
  await page.waitForFunction(
    () => window.sawGatewayGone && document.getElementById("link")?.textContent === "broker connected",
    null,
    { timeout: 20000 },
  );
  execSync(process.env.DRIVE, { stdio: "inherit" });
  await page.waitForFunction(
    (r) => document.querySelector(`[data-robot=${r}] .motion`)?.textContent === "backward",
    robot,
    { timeout: 10000 },
  );
  await page.screenshot({ path: `${artifacts}/ui-after-gateway-restart.png`, fullPage: true });
  console.log("browser: the live stream came back after the gateway restart");
} finally {
  await browser.close();
}
