// Drives the chat page's branches in headless Chromium: regenerate a reply, step between its
// versions, edit a message, step back to the original, and find a second tab and a reload on
// the same branch. Usage: node branches.cjs URL
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [url] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const open = async () => {
      const page = await browser.newPage();
      page.on("pageerror", (e) => console.error("page error:", e.message));
      await page.goto(url);
      await page.waitForFunction(
        () => document.getElementById("status").textContent === "connected", null, { timeout: 15000 });
      return page;
    };
    // The bubbles on show, each as "role:text" with its version when it has several.
    const shown = (page) => page.evaluate(() => [...document.querySelectorAll(".message")].map((el) => {
      const version = el.querySelector(".version");
      const text = el.firstChild ? el.firstChild.textContent : "";
      return `${el.classList.contains("user") ? "user" : "agent"}:${text}${version ? ` (${version.textContent})` : ""}`;
    }));
    const expectShown = async (page, want, what) => {
      try {
        await page.waitForFunction((want) => JSON.stringify([...document.querySelectorAll(".message")].map((el) => {
          const version = el.querySelector(".version");
          const text = el.firstChild ? el.firstChild.textContent : "";
          return `${el.classList.contains("user") ? "user" : "agent"}:${text}${version ? ` (${version.textContent})` : ""}`;
        })) === JSON.stringify(want), want, { timeout: 15000 });
      } catch (e) {
        throw new Error(`${what}: wanted ${JSON.stringify(want)}, shown ${JSON.stringify(await shown(page))}`);
      }
    };

    const page = await open();
    await page.fill("#text", "Hello");
    await page.click("#send");
    await expectShown(page, ["user:Hello", "agent:Echo: Hello"], "the first reply");

    await page.click(".message.assistant .regenerate");
    await expectShown(page, ["user:Hello", "agent:Echo: Hello (2/2)"], "a second reply, the one shown");
    await page.click(".message.assistant .previous");
    await expectShown(page, ["user:Hello", "agent:Echo: Hello (1/2)"], "back to the first reply");

    page.once("dialog", (dialog) => dialog.accept("Hello again"));
    await page.click(".message.user .edit");
    await expectShown(page, ["user:Hello again (2/2)", "agent:Echo: Hello again"], "the edit and its reply");

    const other = await open();
    await expectShown(other, ["user:Hello again (2/2)", "agent:Echo: Hello again"], "a second tab on the same branch");
    await page.click(".message.user .previous");
    // The head lands on the newest message through the original: its second reply.
    const original = ["user:Hello (1/2)", "agent:Echo: Hello (2/2)"];
    await expectShown(page, original, "back to the original message");
    await expectShown(other, original, "the second tab follows");

    await page.reload();
    await expectShown(page, original, "a reload lands on the same branch");
    console.log("branches ok");
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
