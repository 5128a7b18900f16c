// Drives the chat page in headless Chromium: connect, send, see the reply, lose the socket,
// reconnect and find the history again. Usage: node chat-page.cjs URL [SCREENSHOT.png]
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [url, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => console.error("page error:", e.message));
    const connected = () => page.waitForFunction(
      () => document.getElementById("status").textContent === "connected", null, { timeout: 15000 });

    await page.goto(url);
    await connected();
    if (await page.evaluate(() => location.hash.includes("token"))) {
      throw new Error("the token stayed in the address bar");
    }
    await page.fill("#text", "Hello from the browser");
    await page.click("#send");
    await page.waitForSelector('.message.assistant:has-text("Echo: Hello from the browser")', { timeout: 15000 });
    await page.waitForSelector(".message.user:not(.pending)", { timeout: 5000 });

    // The socket drops; the page reconnects, authenticates again and reloads the history.
    await page.evaluate(() => window.chat.socket.close());
    await page.waitForFunction(
      () => document.getElementById("status").textContent.startsWith("disconnected"), null, { timeout: 5000 });
    await connected();
    await page.waitForFunction(() => document.querySelectorAll(".message").length === 2, null, { timeout: 10000 });
    await page.fill("#text", "Still there?");
    await page.click("#send");
    await page.waitForSelector('.message.assistant:has-text("Echo: Still there?")', { timeout: 15000 });

    if (screenshot) await page.screenshot({ path: screenshot });
    console.log("chat page ok");
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
