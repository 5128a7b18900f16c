//! Lambda as the functions meet it on AWS: each function binary runs in execution environments
//! (processes) of its own, each pulling invocations over the Lambda Runtime API
//! (`/2018-06-01/runtime/invocation/next`, `…/{id}/response`, `…/{id}/error`), and callers
//! invoke functions through the Invoke API (`POST /2015-03-31/functions/{name}/invocations`),
//! the one `konstruct-local serve --lambda-endpoint` and the event source use.
//!
//! What it models: an environment is started on demand (a cold start) and kept warm for the
//! next invocation; at most `concurrency` environments per function (its reserved concurrency),
//! past which an invocation is refused 429 `TooManyRequestsException`; each invocation gets
//! `Lambda-Runtime-Deadline-Ms` = now + the function's timeout, and an environment still
//! running at its deadline is killed (`Task timed out`), as Lambda does. A function error is
//! answered 200 with `X-Amz-Function-Error`. Not modelled: freezing idle environments, their
//! recycling after hours, memory limits.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot};

/// A function as the template declares it.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Environments at most (reserved concurrency).
    pub concurrency: usize,
}

/// What an environment is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Started, not yet asking for work: its cold start.
    Starting,
    /// Waiting in `next`.
    Idle,
    Busy,
}

struct Environment {
    function: String,
    phase: Phase,
    child: Child,
}

struct Pending {
    id: String,
    payload: Bytes,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    Response(Bytes),
    Error(Bytes),
}

#[derive(Default)]
struct Inner {
    specs: HashMap<String, FunctionSpec>,
    environments: Mutex<HashMap<u64, Environment>>,
    pending: Mutex<HashMap<String, VecDeque<Pending>>>,
    /// Invocations handed to an environment: which one, and where the answer goes.
    running: Mutex<HashMap<String, (u64, oneshot::Sender<Answer>)>>,
    work: Notify,
    next_environment: AtomicU64,
    next_request: AtomicU64,
    cold_starts: AtomicU64,
    address: Mutex<String>,
}

/// The emulator; the last clone dropped stops its server and every environment.
#[derive(Clone)]
pub struct Lambda {
    /// `http://127.0.0.1:{port}`: the Invoke API's endpoint.
    pub url: String,
    inner: Arc<Inner>,
    _running: Arc<Running>,
}

struct Running {
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
        for (_, mut env) in self.inner.environments.lock().unwrap().drain() {
            let _ = env.child.start_kill();
        }
    }
}

impl Lambda {
    pub async fn start(functions: Vec<FunctionSpec>) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            specs: functions.into_iter().map(|f| (f.name.clone(), f)).collect(),
            ..Inner::default()
        });
        let app = Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .route("/e/{env}/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/e/{env}/2018-06-01/runtime/invocation/{id}/response",
                post(respond),
            )
            .route(
                "/e/{env}/2018-06-01/runtime/invocation/{id}/error",
                post(fail),
            )
            .route("/e/{env}/2018-06-01/runtime/init/error", post(init_error))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        *inner.address.lock().unwrap() = address.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{address}"),
            _running: Arc::new(Running {
                inner: inner.clone(),
                server,
            }),
            inner,
        })
    }

    /// Environments started so far (cold starts), across functions.
    pub fn cold_starts(&self) -> u64 {
        self.inner.cold_starts.load(Ordering::Relaxed)
    }

    /// Invokes a function directly (what the Invoke API does for a caller).
    pub async fn invoke(&self, function: &str, payload: Bytes) -> Result<Bytes, String> {
        match call(&self.inner, function, payload).await {
            Ok(Answer::Response(body)) => Ok(body),
            Ok(Answer::Error(body)) => Err(String::from_utf8_lossy(&body).into_owned()),
            Err(refused) => Err(format!("{refused:?}")),
        }
    }
}

#[derive(Debug)]
enum Refused {
    NoSuchFunction,
    Throttled,
    TimedOut(Duration),
}

/// Queues an invocation, starting an environment when none is free and the function may have
/// another, and waits for its answer until the function's timeout.
async fn call(inner: &Arc<Inner>, function: &str, payload: Bytes) -> Result<Answer, Refused> {
    let spec = inner
        .specs
        .get(function)
        .ok_or(Refused::NoSuchFunction)?
        .clone();
    let id = format!(
        "00000000-0000-4000-8000-{:012}",
        inner.next_request.fetch_add(1, Ordering::Relaxed)
    );
    let (answer, answered) = oneshot::channel();
    {
        let mut environments = inner.environments.lock().unwrap();
        // An environment whose process died (a crash) is gone.
        environments.retain(|_, e| !matches!(e.child.try_wait(), Ok(Some(_))));
        let mut pending = inner.pending.lock().unwrap();
        let queue = pending.entry(function.to_owned()).or_default();
        let mine = environments.values().filter(|e| e.function == function);
        let busy = mine.clone().filter(|e| e.phase == Phase::Busy).count();
        let free = mine.clone().filter(|e| e.phase != Phase::Busy).count();
        let total = mine.count();
        if busy + queue.len() >= spec.concurrency {
            return Err(Refused::Throttled);
        }
        if queue.len() + 1 > free && total < spec.concurrency {
            spawn(inner, &spec, &mut environments);
        }
        queue.push_back(Pending {
            id: id.clone(),
            payload,
            answer,
        });
    }
    inner.work.notify_waiters();
    match tokio::time::timeout(spec.timeout, answered).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(Refused::TimedOut(spec.timeout)),
        Err(_) => {
            // Lambda stops the environment that ran out of time; the next call starts anew.
            let holder = inner.running.lock().unwrap().remove(&id).map(|(e, _)| e);
            if let Some(env) = holder
                && let Some(mut env) = inner.environments.lock().unwrap().remove(&env)
            {
                let _ = env.child.start_kill();
            }
            inner
                .pending
                .lock()
                .unwrap()
                .entry(function.to_owned())
                .or_default()
                .retain(|p| p.id != id);
            Err(Refused::TimedOut(spec.timeout))
        }
    }
}

fn spawn(inner: &Arc<Inner>, spec: &FunctionSpec, environments: &mut HashMap<u64, Environment>) {
    let number = inner.next_environment.fetch_add(1, Ordering::Relaxed);
    let address = inner.address.lock().unwrap().clone();
    let mut command = Command::new(&spec.binary);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://{address}/e/{number}"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", &spec.name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env(
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", spec.name),
        )
        .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("sim/{number}"))
        .env("AWS_REGION", "us-east-1")
        // The template's `LoggingConfig`.
        .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        // A function logs to stdout, as Lambda collects it: shown with TEST_LOG.
        .stdout(log_output())
        .stderr(log_output())
        .kill_on_drop(true);
    match command.spawn() {
        Ok(mut child) => {
            let stream = format!("{}/{number}", spec.name);
            if let Some(out) = child.stdout.take() {
                tokio::spawn(forward_log(out, stream.clone()));
            }
            if let Some(err) = child.stderr.take() {
                tokio::spawn(forward_log(err, stream));
            }
            inner.cold_starts.fetch_add(1, Ordering::Relaxed);
            environments.insert(
                number,
                Environment {
                    function: spec.name.clone(),
                    phase: Phase::Starting,
                    child,
                },
            );
        }
        Err(e) => tracing::error!(function = %spec.name, error = %e, "environment not started"),
    }
}

fn log_output() -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    }
}

/// Writes a function's log lines to stderr as CloudWatch keeps them: each with the time it was
/// received (seconds since the epoch, to the microsecond) and its log stream, so the lines of
/// several functions can be read as one timeline.
async fn forward_log(output: impl tokio::io::AsyncRead + Unpin, stream: String) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "{}.{:06} {stream} {line}",
            now.as_secs(),
            now.subsec_micros()
        );
    }
}

fn function_of(inner: &Inner, env: u64) -> Option<String> {
    inner
        .environments
        .lock()
        .unwrap()
        .get(&env)
        .map(|e| e.function.clone())
}

fn set_phase(inner: &Inner, env: u64, phase: Phase) {
    if let Some(e) = inner.environments.lock().unwrap().get_mut(&env) {
        e.phase = phase;
    }
}

async fn next(State(inner): State<Arc<Inner>>, Path(env): Path<u64>) -> Response {
    let Some(function) = function_of(&inner, env) else {
        return StatusCode::GONE.into_response();
    };
    set_phase(&inner, env, Phase::Idle);
    let pending = loop {
        let notified = inner.work.notified();
        let taken = inner
            .pending
            .lock()
            .unwrap()
            .get_mut(&function)
            .and_then(VecDeque::pop_front);
        if let Some(pending) = taken {
            break pending;
        }
        notified.await;
    };
    set_phase(&inner, env, Phase::Busy);
    let spec = &inner.specs[&function];
    let deadline = std::time::SystemTime::now() + spec.timeout;
    let deadline_ms = deadline
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    inner
        .running
        .lock()
        .unwrap()
        .insert(pending.id.clone(), (env, pending.answer));
    let mut headers = HeaderMap::new();
    headers.insert("Lambda-Runtime-Aws-Request-Id", pending.id.parse().unwrap());
    headers.insert(
        "Lambda-Runtime-Deadline-Ms",
        deadline_ms.to_string().parse().unwrap(),
    );
    headers.insert(
        "Lambda-Runtime-Invoked-Function-Arn",
        format!("arn:aws:lambda:us-east-1:123456789012:function:{function}")
            .parse()
            .unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    (headers, pending.payload).into_response()
}

fn finish(inner: &Inner, env: u64, id: &str, answer: Answer) {
    if let Some((_, to)) = inner.running.lock().unwrap().remove(id) {
        let _ = to.send(answer);
    }
    set_phase(inner, env, Phase::Idle);
}

async fn respond(
    State(inner): State<Arc<Inner>>,
    Path((env, id)): Path<(u64, String)>,
    body: Bytes,
) -> StatusCode {
    finish(&inner, env, &id, Answer::Response(body));
    StatusCode::ACCEPTED
}

async fn fail(
    State(inner): State<Arc<Inner>>,
    Path((env, id)): Path<(u64, String)>,
    body: Bytes,
) -> StatusCode {
    finish(&inner, env, &id, Answer::Error(body));
    StatusCode::ACCEPTED
}

async fn init_error(
    State(inner): State<Arc<Inner>>,
    Path(env): Path<u64>,
    body: Bytes,
) -> StatusCode {
    tracing::error!(env, error = %String::from_utf8_lossy(&body), "environment failed to start");
    if let Some(mut e) = inner.environments.lock().unwrap().remove(&env) {
        let _ = e.child.start_kill();
    }
    StatusCode::ACCEPTED
}

async fn invoke(
    State(inner): State<Arc<Inner>>,
    Path(name): Path<String>,
    payload: Bytes,
) -> Response {
    let error = |status: StatusCode, kind: &str, message: String| {
        (
            status,
            [("x-amzn-ErrorType", kind.to_owned())],
            axum::Json(json!({ "Type": "User", "message": message })),
        )
            .into_response()
    };
    match call(&inner, &name, payload).await {
        Ok(Answer::Response(body)) => (StatusCode::OK, body).into_response(),
        Ok(Answer::Error(body)) => (
            StatusCode::OK,
            [("X-Amz-Function-Error", "Unhandled")],
            body,
        )
            .into_response(),
        Err(Refused::NoSuchFunction) => error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("Function not found: {name}"),
        ),
        Err(Refused::Throttled) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            "Rate Exceeded.".to_owned(),
        ),
        Err(Refused::TimedOut(after)) => (
            StatusCode::OK,
            [("X-Amz-Function-Error", "Unhandled")],
            axum::Json(json!({
                "errorType": "Sandbox.Timedout",
                "errorMessage": format!("Task timed out after {:.2} seconds", after.as_secs_f64()),
            })),
        )
            .into_response(),
    }
}
