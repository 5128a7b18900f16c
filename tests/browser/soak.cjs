// The randomized soak's browser side (run by tests/src/soak.rs, which owns the servers): four
// tabs of the chat page over two conversations of two users, and a seeded schedule of what
// people and networks do, with the server's faults asked for on stdout ("FAULT <kind>", answered
// "DONE" on stdin). At the end it writes "TRANSCRIPTS <json>" (what every tab holds and shows)
// whenever it reads "DUMP", until it reads "END".
// Usage: node soak.cjs '{"url","faults":[…],"secret","seed","seconds","seats":[{"user","conversation"}]}'
"use strict";
const crypto = require("node:crypto");
const readline = require("node:readline");
const { chromium } = require("playwright-core");

const input = JSON.parse(process.argv[2]);
const log = (...what) => console.log("soak:", ...what);

// mulberry32: a small seeded generator, so a seed replays the same schedule.
function generator(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = generator(Number(input.seed));
const between = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
const pick = (list) => list[Math.floor(random() * list.length)];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Tokens as the portal mints them (HS256), short-lived so that renewal happens all the time.
const TOKEN_SECONDS = 75;
function token(user, seconds = TOKEN_SECONDS) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: user, role: "customer_operator", iat: now, exp: now + seconds })}`;
  return `${body}.${crypto.createHmac("sha256", input.secret).update(body).digest("base64url")}`;
}

// The server side's answers, line by line.
const answers = [];
const waiting = [];
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const next = waiting.shift();
  if (next) next(line); else answers.push(line);
});
const ask = (line) => {
  console.log(line);
  return answers.length ? Promise.resolve(answers.shift()) : new Promise((r) => waiting.push(r));
};

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-background-timer-throttling", "--disable-renderer-backgrounding"],
  });
  const counts = {};
  const did = (what) => { counts[what] = (counts[what] || 0) + 1; };
  try {
    // One browser context per user (its own storage and network), two tabs each.
    const users = [];
    for (const seat of input.seats) {
      users.push({ seat, context: await browser.newContext(), tabs: [], withheldUntil: 0, offline: false });
    }
    let tabNumber = 0;
    const open = async (user) => {
      const page = await user.context.newPage();
      const tab = { name: `tab${++tabNumber}`, user, page };
      page.on("pageerror", (e) => log(tab.name, "page error:", e.message));
      await page.goto(`${input.url}/?conversation=${user.seat.conversation}#token=${token(user.seat.user)}`);
      user.tabs.push(tab);
      return tab;
    };
    for (const user of users) { await open(user); await open(user); }
    const tabs = () => users.flatMap((u) => u.tabs);

    // Fresh tokens for every tab of a user whose tokens are not being let expire.
    const refresh = async () => {
      for (const user of users) {
        if (Date.now() < user.withheldUntil) continue;
        for (const tab of user.tabs) {
          const fresh = token(user.seat.user);
          await tab.page.evaluate((t) => sessionStorage.setItem("konstruct.token", t), fresh).catch(() => {});
        }
      }
    };
    const refresher = setInterval(refresh, 8000);

    let n = 0;
    const text = () => `m${++n} ${Math.random().toString(36).slice(2, 8)}`;
    const send = (tab, what) => tab.page.evaluate((t) => window.chat && window.chat.send(t), what);
    const actions = {
      async send() { const tab = pick(tabs()); await send(tab, text()); },
      async doubleSend() {
        const tab = pick(tabs());
        await tab.page.evaluate(([a, b]) => { window.chat.send(a); window.chat.send(b); }, [text(), text()]);
      },
      async offline() {
        const user = pick(users);
        user.offline = true;
        await user.context.setOffline(true);
        for (const tab of user.tabs) await tab.page.evaluate(() => window.chat && window.chat.socket && window.chat.socket.close()).catch(() => {});
        await send(pick(user.tabs), text());
        await sleep(between(500, 4000));
        await user.context.setOffline(false);
        user.offline = false;
      },
      async reload() { const tab = pick(tabs()); await tab.page.reload(); },
      async closeAndReopen() {
        const tab = pick(tabs());
        const user = tab.user;
        user.tabs.splice(user.tabs.indexOf(tab), 1);
        await tab.page.close();
        await sleep(between(0, 2000));
        await open(user);
      },
      async cancel() {
        const tab = pick(tabs());
        await tab.page.evaluate(() => {
          const stop = document.getElementById("stop");
          if (stop && stop.style.display !== "none") stop.click();
        });
      },
      async expireTokens() {
        // Stop renewing one user's tokens long enough for them to expire; renewed after.
        const user = pick(users);
        user.withheldUntil = Date.now() + (TOKEN_SECONDS + between(5, 25)) * 1000;
      },
      async pause() { await sleep(between(1000, 4000)); },
    };
    const weights = [
      ["send", 34], ["doubleSend", 8], ["offline", 8], ["reload", 8], ["closeAndReopen", 6],
      ["cancel", 10], ["expireTokens", 3], ["pause", 8],
    ];
    const total = weights.reduce((s, [, w]) => s + w, 0);
    const choose = () => {
      let r = random() * total;
      for (const [name, w] of weights) { if ((r -= w) < 0) return name; }
      return "send";
    };

    // Each fault at least once, at spread times in a shuffled order, and a few more at random.
    const kinds = input.faults;
    const planned = kinds.map((k) => [random(), k]).sort((a, b) => a[0] - b[0]).map(([, k], i) =>
      ({ at: (i + 1) / (kinds.length + 1), kind: k }));
    const started = Date.now();
    const seconds = Number(input.seconds);
    log(`seed ${input.seed}, ${seconds} s, ${tabs().length} tabs`);
    while ((Date.now() - started) / 1000 < seconds) {
      const progress = (Date.now() - started) / 1000 / seconds;
      let name;
      if (planned.length && progress >= planned[0].at) name = `FAULT ${planned.shift().kind}`;
      else if (random() < 0.02) name = `FAULT ${pick(kinds)}`;
      else name = choose();
      try {
        if (name.startsWith("FAULT ")) {
          const answer = await ask(name);
          if (answer !== "DONE") throw new Error(`fault not done: ${answer}`);
        } else {
          await actions[name]();
        }
        did(name);
      } catch (e) {
        log(`${name} failed (${e.message.split("\n")[0]}); going on`);
      }
      await sleep(between(150, 1200));
    }

    // Quiet: everyone online with fresh tokens; wait for every tab to settle.
    log("schedule done:", JSON.stringify(counts));
    for (const user of users) { user.withheldUntil = 0; await user.context.setOffline(false); }
    await refresh();
    const settledBy = Date.now() + 120000;
    for (const tab of tabs()) {
      for (;;) {
        const state = await tab.page.evaluate(() => window.chat && {
          state: window.chat.state,
          pending: window.chat.outbox.size,
          streaming: window.chat.messages.filter((m) => m.status === "streaming").length,
        }).catch(() => null);
        if (state && state.state === "connected" && state.pending === 0 && state.streaming === 0) break;
        if (Date.now() > settledBy) { log(tab.name, "did not settle:", JSON.stringify(state)); break; }
        await sleep(500);
      }
    }
    clearInterval(refresher);
    const refresher2 = setInterval(refresh, 8000);

    const transcripts = async () => ({
      actions: counts,
      tabs: await Promise.all(tabs().map(async (tab) => ({
        name: tab.name,
        conversation: tab.user.seat.conversation,
        ...(await tab.page.evaluate(() => ({
          messages: window.chat.messages.map((m) => ({
            id: m.id, seq: m.seq, role: m.role, content: m.content, status: m.status, error: m.error ?? null,
          })),
          bubbles: [...document.querySelectorAll(".message")].map((el) => el.firstChild ? el.firstChild.textContent : ""),
        }))),
      }))),
    });
    for (;;) {
      const answer = await ask(`TRANSCRIPTS ${JSON.stringify(await transcripts())}`);
      if (answer === "END") break;
    }
    clearInterval(refresher2);
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
