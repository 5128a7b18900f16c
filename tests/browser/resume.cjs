// Drives the chat page (and its client module) through drops, a reload and a second tab while
// replies stream from a slow model. Usage: node resume.cjs URL
// The model answers "Streaming answer to: <text>." in pieces, about two seconds a reply.
"use strict";
const { chromium } = require("playwright-core");

const answer = (text) => `Streaming answer to: ${text}.`;

async function main() {
  const [url, mode] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const step = (what) => console.log("step:", what);
  try {
    const context = await browser.newContext();
    const open = async () => {
      const page = await context.newPage();
      page.on("pageerror", (e) => console.error("page error:", e.message));
      await page.goto(url);
      await connected(page);
      return page;
    };
    const connected = (page) => page.waitForFunction(
      () => window.chat && window.chat.state === "connected", null, { timeout: 15000 });
    // What the page shows: each bubble's role, status and text.
    const shown = (page) => page.evaluate(() => [...document.querySelectorAll(".message")].map(
      (el) => ({ role: el.classList.contains("user") ? "user" : "assistant",
        status: ["pending", "streaming", "complete", "cancelled", "failed"].find((s) => el.classList.contains(s)),
        text: el.firstChild ? el.firstChild.textContent : "" })));
    const streaming = (page) => page.waitForFunction(
      () => [...document.querySelectorAll(".message.assistant.streaming")].some((el) => el.textContent.length > 0),
      null, { timeout: 15000 });
    const settled = (page, text) => page.waitForFunction(
      (want) => [...document.querySelectorAll(".message.assistant.complete")].some((el) => el.firstChild && el.firstChild.textContent === want),
      answer(text), { timeout: 20000 });
    // Every question once and its full answer once, in order.
    const expectExactly = async (page, questions) => {
      const want = questions.flatMap((q) => [
        { role: "user", status: "complete", text: q },
        { role: "assistant", status: "complete", text: answer(q) }]);
      let got;
      for (let i = 0; i < 50; i++) {
        got = await shown(page);
        if (JSON.stringify(got) === JSON.stringify(want)) return;
        await page.waitForTimeout(100);
      }
      throw new Error(`page shows ${JSON.stringify(got)}\nwanted ${JSON.stringify(want)}`);
    };
    const asked = [];

    if (mode === "cuts") {
      // The server cuts every socket after 2 s, and any socket quiet for 1 s: replies stream
      // across the cuts, and the page resumes each time.
      const a = await open();
      for (const q of ["across the cuts", "and again", "once more"]) {
        await a.evaluate((text) => window.chat.send(text), q);
        asked.push(q);
        await settled(a, q);
      }
      await expectExactly(a, asked);
      const reconnects = await a.evaluate(() => window.chat.reconnects);
      if (reconnects < 2) throw new Error(`only ${reconnects} reconnects: the cuts did not happen`);
      console.log("cuts ok after", reconnects, "reconnects");
      return;
    }

    step("drop the socket mid-stream: the page resumes and ends with the reply once");
    const a = await open();
    await a.evaluate(() => window.chat.send("first"));
    asked.push("first");
    await streaming(a);
    await a.evaluate(() => window.chat.socket.close());
    await settled(a, "first");
    await expectExactly(a, asked);

    step("a second tab opened mid-stream shows the text so far, then the tail");
    await a.evaluate(() => window.chat.send("second"));
    asked.push("second");
    await streaming(a);
    const b = await open();
    await settled(b, "second");
    await settled(a, "second");
    await expectExactly(b, asked);
    await expectExactly(a, asked);

    step("reload mid-stream");
    await a.evaluate(() => window.chat.send("third"));
    asked.push("third");
    await streaming(a);
    await a.reload();
    await connected(a);
    await settled(a, "third");
    await expectExactly(a, asked);
    await settled(b, "third");
    await expectExactly(b, asked);

    step("typed while disconnected: pending, then sent and answered once");
    await a.evaluate(() => { window.chat.socket.close(); window.chat.send("offline"); });
    asked.push("offline");
    const pending = await shown(a);
    if (!pending.some((m) => m.text === "offline" && m.status === "pending")) {
      throw new Error(`not shown as pending: ${JSON.stringify(pending)}`);
    }
    await settled(a, "offline");
    await expectExactly(a, asked);

    step("the socket drops between send and ack: resent, stored and answered once");
    await a.evaluate(() => {
      const socket = window.chat.socket;
      window.chat.send("unacknowledged");
      socket.close();
    });
    asked.push("unacknowledged");
    await settled(a, "unacknowledged");
    await expectExactly(a, asked);
    await settled(b, "unacknowledged");
    await expectExactly(b, asked);

    step("cancel mid-stream: the reply stops, kept with what it had");
    await a.evaluate(() => window.chat.send("stop me"));
    await streaming(a);
    const replyTo = await a.evaluate(() => document.getElementById("stop").dataset.replyTo);
    // The page's Stop button, pressed at once (no waiting for the bubbles to stop moving).
    const pressedAt = Date.now();
    await a.evaluate(() => document.getElementById("stop").click());
    console.log("stop pressed after", Date.now() - pressedAt, "ms");
    try {
      await a.waitForSelector(".message.assistant.cancelled", { timeout: 10000 });
    } catch (e) {
      console.error("stop pressed for", replyTo, "; page holds", JSON.stringify(await a.evaluate(() => window.chat.messages)));
      throw e;
    }
    console.log("resume ok");
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
