//! Streaming as one person feels it: a stand-in OpenAI-compatible model that streams a reply in
//! pieces at a steady pace, and a client that sends messages one after another and times, for
//! each reply, the first chunk (from `message` sent) and the gaps between chunks.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use axum::routing::post;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::stack::Seat;

/// A model that answers every request with `pieces` pieces, `gap` apart (the first at once).
/// Returns its base URL (`OPENAI_BASE_URL`).
pub async fn start_model(pieces: usize, gap: Duration) -> anyhow::Result<String> {
    serve_model(move || {
        (0..pieces)
            .map(|i| if i == 0 { Duration::ZERO } else { gap })
            .collect()
    })
    .await
}

/// A model whose replies differ in length and pace, as a real one's do: each streams 3 to 24
/// pieces, 5 to 150 ms apart, drawn from `seed` (so a run can be repeated). Returns its base URL.
pub async fn start_random_model(seed: u64) -> anyhow::Result<String> {
    let rng = std::sync::Mutex::new(fastrand::Rng::with_seed(seed));
    serve_model(move || {
        let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
        let pieces = rng.usize(3..25);
        (0..pieces)
            .map(|_| Duration::from_millis(rng.u64(5..150)))
            .collect()
    })
    .await
}

/// An OpenAI-compatible streaming model: for each request, `plan` gives the wait before each
/// piece (`piece0 `, `piece1 `, …), then `[DONE]`. Returns its base URL.
async fn serve_model(
    plan: impl Fn() -> Vec<Duration> + Send + Sync + 'static,
) -> anyhow::Result<String> {
    let plan = std::sync::Arc::new(plan);
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |_body: Bytes| {
            let waits = plan();
            async move {
                let pieces = waits.len();
                let events = futures::stream::iter(0..=pieces).then(move |i| {
                    let wait = waits.get(i).copied().unwrap_or_default();
                    async move {
                        tokio::time::sleep(wait).await;
                        let data = if i < pieces {
                            json!({ "choices": [{ "index": 0, "delta": { "content": format!("piece{i} ") } }] })
                                .to_string()
                        } else {
                            "[DONE]".to_owned()
                        };
                        Ok::<_, std::io::Error>(Bytes::from(format!("data: {data}\n\n")))
                    }
                });
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(Body::from_stream(events))
                    .expect("a response")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}/v1"))
}

/// What the client saw, in microseconds.
pub struct Streamed {
    pub first_chunk: Histogram<u64>,
    pub chunk_gap: Histogram<u64>,
    pub reply: Histogram<u64>,
    pub replies: usize,
}

/// One socket on `seat`, `messages` messages one after another, each sent when the previous
/// reply's `response` arrived. Checks that each reply's chunks, applied by offset, are its text.
pub async fn one_after_another(
    address: &str,
    seat: &Seat,
    messages: usize,
) -> anyhow::Result<Streamed> {
    let url = format!("ws://{address}/chat/ws/{}", seat.conversation);
    let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let (mut sink, mut frames) = socket.split();
    let auth = json!({ "type": "auth", "token": seat.token });
    sink.send(Message::Text(auth.to_string().into())).await?;
    let mut next = async || -> anyhow::Result<Value> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), frames.next())
                .await
                .context("nothing within 30 s")?
                .ok_or_else(|| anyhow!("socket closed"))??;
            if let Message::Text(text) = message {
                return Ok(serde_json::from_str(&text)?);
            }
        }
    };
    anyhow::ensure!(next().await?["type"] == "auth_ok", "auth failed");
    let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
    let mut streamed = Streamed {
        first_chunk: histogram()?,
        chunk_gap: histogram()?,
        reply: histogram()?,
        replies: 0,
    };
    for n in 0..messages {
        let frame = json!({ "type": "message", "text": format!("stream {n}") });
        let sent = Instant::now();
        sink.send(Message::Text(frame.to_string().into())).await?;
        let mut text = String::new();
        let mut last_chunk: Option<Instant> = None;
        loop {
            let frame = next().await?;
            match frame["type"].as_str() {
                Some("chunk") => {
                    let now = Instant::now();
                    match last_chunk {
                        None => streamed.first_chunk.record(micros(now - sent))?,
                        Some(previous) => streamed.chunk_gap.record(micros(now - previous))?,
                    }
                    last_chunk = Some(now);
                    if frame["offset"].as_u64() == Some(text.chars().count() as u64) {
                        text.push_str(frame["delta"].as_str().unwrap_or_default());
                    }
                }
                Some("response") => {
                    streamed.reply.record(micros(sent.elapsed()))?;
                    if let Some(whole) = frame["text"].as_str() {
                        anyhow::ensure!(whole == text, "chunks {text:?} against {whole:?}");
                    }
                    streamed.replies += 1;
                    break;
                }
                Some("error") => return Err(anyhow!("error frame: {frame}")),
                _ => {}
            }
        }
    }
    Ok(streamed)
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}
