//! Streamed replies as a client sees them.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::llm::{FakeLlm, Reply, pieces};

/// The text a client following the protocol holds after these frames: a chunk is applied from
/// the length held when its offset is at or below it (a chunk that overlaps what is held gives
/// only its new part; `reset` starts over), a `response` with text replaces it.
pub fn assembled(frames: &[Value], message: &Value) -> String {
    let mut text: Vec<char> = Vec::new();
    for frame in frames.iter().filter(|f| f["message_id"] == *message) {
        match frame["type"].as_str() {
            Some("chunk") => {
                if frame["reset"] == true {
                    text.clear();
                }
                let offset = frame["offset"].as_u64().unwrap() as usize;
                if offset <= text.len() {
                    let delta = frame["delta"].as_str().unwrap();
                    text.extend(delta.chars().skip(text.len() - offset));
                }
            }
            Some("response") => {
                if let Some(whole) = frame["text"].as_str() {
                    text = whole.chars().collect();
                }
            }
            _ => {}
        }
    }
    text.into_iter().collect()
}

/// A model streaming six pieces 150 ms apart.
pub async fn slow_model() -> FakeLlm {
    FakeLlm::start(|_, _| {
        Reply::Stream(
            pieces(&["The ", "answer ", "comes ", "in ", "six ", "pieces."]),
            Duration::from_millis(150),
        )
    })
    .await
}
