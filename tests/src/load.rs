//! A load driver over real WebSockets that accounts for every message: each conversation has
//! one sending socket and any number of listening ones; every acknowledged message must get
//! exactly one reply on every socket of its conversation, in the order the messages were
//! acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stack::Seat;

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// How messages are sent.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// `total` messages at a fixed offered rate, spread over the conversations in turn.
    Rate { per_second: f64, total: usize },
    /// `per_conversation` messages from each sender, at most `window` awaiting their reply.
    FullSpeed {
        per_conversation: usize,
        window: usize,
    },
}

#[derive(Debug)]
pub struct Report {
    pub sent: usize,
    pub acked: usize,
    /// Acknowledged messages whose reply reached the sender.
    pub replied: usize,
    /// Acknowledged messages whose reply is missing on some socket of the conversation.
    pub lost: usize,
    /// Replies that arrived more than once on one socket.
    pub duplicated: usize,
    /// Sockets whose replies came in another order than the acknowledgements.
    pub out_of_order: usize,
    /// Messages the sender was told had failed (`internal` while the queue went away) that
    /// were answered all the same: the job was queued after all, or the next message's job
    /// answered the stored message first (a resend would have been de-duplicated). Each counts
    /// once, however many sockets saw its reply.
    pub unacknowledged_replies: usize,
    pub errors: Vec<Value>,
    /// From `message` sent to `response` received on the sender, in microseconds.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.replied as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency quantile in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.unacknowledged_replies == 0
            && self.acked == self.sent
    }
}

struct Event {
    socket: usize,
    at: Instant,
    frame: Value,
}

#[derive(Default)]
struct Book {
    sent_at: HashMap<String, Instant>,
    client_of: HashMap<String, String>,
    acks: Vec<Vec<String>>,
    replies: Vec<Vec<String>>,
    /// When each reply first reached its conversation's sender.
    replied_at: HashMap<String, Instant>,
    errors: Vec<Value>,
}

/// Opens `listeners_per_conversation + 1` authenticated sockets per seat, runs the plan, waits
/// (up to `settle`) for the replies, and accounts.
pub async fn run(
    address: &str,
    seats: &[Seat],
    listeners_per_conversation: usize,
    plan: Plan,
    settle: Duration,
) -> anyhow::Result<Report> {
    let per = listeners_per_conversation + 1;
    let (events, mut inbox) = mpsc::unbounded_channel::<Event>();
    let mut senders: Vec<Arc<Mutex<Sink>>> = Vec::new();
    let mut conversation_of = Vec::new();
    for (c, seat) in seats.iter().enumerate() {
        for k in 0..per {
            let url = format!("ws://{address}/chat/ws/{}", seat.conversation);
            // A browser disables Nagle on its sockets, and so does this client.
            let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .context("connect")?;
            let (mut sink, mut stream) = socket.split();
            sink.send(Message::Text(
                json!({ "type": "auth", "token": seat.token })
                    .to_string()
                    .into(),
            ))
            .await?;
            match stream.next().await {
                Some(Ok(Message::Text(t))) if t.contains("auth_ok") => {}
                other => return Err(anyhow!("auth failed: {other:?}")),
            }
            let index = conversation_of.len();
            conversation_of.push(c);
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Text(text) = message
                        && let Ok(frame) = serde_json::from_str(&text)
                    {
                        let _ = events.send(Event {
                            socket: index,
                            at: Instant::now(),
                            frame,
                        });
                    }
                }
            });
            let sink = Arc::new(Mutex::new(sink));
            if k == 0 {
                senders.push(sink);
            }
        }
    }
    drop(events);
    let sockets = conversation_of.len();
    let book = Arc::new(Mutex::new(Book {
        acks: vec![Vec::new(); seats.len()],
        replies: vec![Vec::new(); sockets],
        ..Book::default()
    }));
    let windows: Vec<Arc<Semaphore>> = match plan {
        Plan::FullSpeed { window, .. } => (0..seats.len())
            .map(|_| Arc::new(Semaphore::new(window)))
            .collect(),
        Plan::Rate { .. } => Vec::new(),
    };
    let collector = {
        let book = book.clone();
        let windows = windows.clone();
        let senders_of: Vec<bool> = {
            let mut first = HashSet::new();
            conversation_of.iter().map(|c| first.insert(*c)).collect()
        };
        let conversation_of = conversation_of.clone();
        tokio::spawn(async move {
            while let Some(event) = inbox.recv().await {
                let mut book = book.lock().await;
                let conversation = conversation_of[event.socket];
                match event.frame["type"].as_str() {
                    Some("ack") if senders_of[event.socket] => {
                        let message = event.frame["message_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        let client = event.frame["client_message_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        book.client_of.insert(message.clone(), client);
                        book.acks[conversation].push(message);
                    }
                    Some("response") => {
                        let reply_to = event.frame["reply_to"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        if senders_of[event.socket] && !book.replied_at.contains_key(&reply_to) {
                            book.replied_at.insert(reply_to.clone(), event.at);
                            if let Some(window) = windows.get(conversation) {
                                window.add_permits(1);
                            }
                        }
                        book.replies[event.socket].push(reply_to);
                    }
                    Some("error") => book.errors.push(event.frame),
                    _ => {}
                }
            }
        })
    };

    let started = Instant::now();
    let mut sent = 0;
    match plan {
        Plan::Rate { per_second, total } => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0..total {
                tick.tick().await;
                send(&senders[n % senders.len()], &book, n).await?;
                sent += 1;
            }
        }
        Plan::FullSpeed {
            per_conversation, ..
        } => {
            let tasks = senders.iter().enumerate().map(|(c, sink)| {
                let (sink, book, window) = (sink.clone(), book.clone(), windows[c].clone());
                async move {
                    for n in 0..per_conversation {
                        window.acquire().await?.forget();
                        send(&sink, &book, c * per_conversation + n).await?;
                    }
                    anyhow::Ok(per_conversation)
                }
            });
            for done in futures::future::join_all(tasks).await {
                sent += done?;
            }
        }
    }

    // Wait until every socket has a reply for every acknowledged message, or time runs out.
    let deadline = Instant::now() + settle;
    loop {
        let complete = {
            let book = book.lock().await;
            let acked: usize = book.acks.iter().map(Vec::len).sum();
            acked + book.errors.len() >= sent
                && conversation_of.iter().enumerate().all(|(s, c)| {
                    let replied: HashSet<&String> = book.replies[s].iter().collect();
                    book.acks[*c].iter().all(|a| replied.contains(a))
                })
        };
        if complete || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    collector.abort();
    for sink in &senders {
        let _ = sink.lock().await.close().await;
    }
    let book = std::mem::take(&mut *book.lock().await);

    // Latency is matched up at the end: a reply can reach the socket before its ack does.
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for (message, at) in &book.replied_at {
        if let Some(sent) = book
            .client_of
            .get(message)
            .and_then(|c| book.sent_at.get(c))
        {
            latency.record((at.duration_since(*sent).as_micros() as u64).max(1))?;
        }
    }
    let mut report = Report {
        sent,
        acked: book.acks.iter().map(Vec::len).sum(),
        replied: book.replied_at.len(),
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        unacknowledged_replies: 0,
        errors: book.errors,
        latency,
        elapsed,
    };
    let mut unacknowledged = HashSet::new();
    for (s, replies) in book.replies.iter().enumerate() {
        let acks = &book.acks[conversation_of[s]];
        let acked: HashSet<&String> = acks.iter().collect();
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for reply in replies {
            if !seen.insert(reply) {
                report.duplicated += 1;
            } else if acked.contains(reply) {
                order.push(reply);
            } else {
                unacknowledged.insert(reply);
            }
        }
        report.lost += acks.iter().filter(|a| !seen.contains(a)).count();
        let in_ack_order: Vec<&String> = acks.iter().filter(|a| seen.contains(a)).collect();
        if order != in_ack_order {
            report.out_of_order += 1;
        }
    }
    report.unacknowledged_replies = unacknowledged.len();
    Ok(report)
}

async fn send(sink: &Mutex<Sink>, book: &Mutex<Book>, n: usize) -> anyhow::Result<()> {
    let client = uuid::Uuid::new_v4().to_string();
    let frame = json!({ "type": "message", "text": format!("load message {n}"), "client_message_id": client });
    book.lock().await.sent_at.insert(client, Instant::now());
    sink.lock()
        .await
        .send(Message::Text(frame.to_string().into()))
        .await?;
    Ok(())
}
