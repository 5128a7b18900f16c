//! The SAM template, validated offline (SAM's translator, then cfn-lint on the result), and
//! held to the workspace: each function crate has its function, and each function binary starts
//! with exactly the environment the template gives it.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::process::Command;
use tokio::sync::mpsc;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn python() -> String {
    std::env::var("KONSTRUCT_PYTHON").expect(
        "KONSTRUCT_PYTHON is not set: run the tests through `make test`, which installs the validators",
    )
}

/// Runs the validator; its exit status and everything it said.
async fn validate(
    template: &std::path::Path,
    functions: Option<&std::path::Path>,
) -> (bool, String) {
    let registry = std::env::temp_dir().join(format!("registry-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&registry, shared::registry::document().to_string()).unwrap();
    let mut command = Command::new(python());
    command
        .arg(format!("{WORKSPACE}/infra/validate_template.py"))
        .arg(template)
        .arg("--registry")
        .arg(&registry);
    if let Some(out) = functions {
        command.arg("--functions").arg(out);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run the validator");
    std::fs::remove_file(&registry).ok();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

fn template() -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{WORKSPACE}/template.yaml"))
}

#[tokio::test]
async fn the_template_translates_and_lints_clean() {
    let (ok, said) = validate(&template(), None).await;
    assert!(ok, "{said}");
    assert!(said.contains("lint clean"), "{said}");
}

#[tokio::test]
async fn broken_templates_fail_validation() {
    let original = std::fs::read_to_string(template()).unwrap();
    let breakages = [
        ("WsConnectFunction.Arn", "WsConectFunction.Arn", "E1019"),
        (
            "Runtime: provided.al2023",
            "Runtime: provided.al2099",
            "E3030",
        ),
        ("Binary: ws-auth", "Binary: ws-authh", "functions/ws-auth"),
        ("RouteKey: auth", "RouteKeyz: auth", "RouteKeyz"),
        // The WebSocket routes against the route table (shared/src/ws/routes.rs).
        ("RouteKey: ping", "RouteKey: pong", "not the route table"),
        (
            "OperationName: ping\n      RouteResponseSelectionExpression: $default\n      Target: !Sub \"integrations/${MessageIntegration}\"",
            "OperationName: ping\n      RouteResponseSelectionExpression: $default\n      Target: !Sub \"integrations/${AuthIntegration}\"",
            "'ping': 'ws-message'",
        ),
        (
            "RouteId: !Ref PingRoute",
            "RouteId: !Ref MessageRoute",
            "PingRoute (ping) has no route response",
        ),
        (
            "      - PingRoute\n",
            "",
            "does not wait for the routes ['PingRoute']",
        ),
        (
            "[\"arn:aws:bedrock:*::foundation-model/\", !Join",
            "[\"arn:aws:bedrock:*::foundation-model/*\", !Join",
            "foundation-model/*",
        ),
        // A secret's value in a function's configuration, however it gets there.
        (
            "DATABASE_URL_SECRET_ARN: !Ref DatabaseUrlSecretArn",
            "DATABASE_URL: !Sub \"{{resolve:secretsmanager:${DatabaseUrlSecretArn}}}\"",
            "resolves a secret",
        ),
        (
            "PORTAL_JWT_SECRET_ARN: !Ref PortalJwtSecretArn",
            "PORTAL_JWT_SECRET: a-portal-secret-of-at-least-32-bytes-0123",
            "puts a secret in the function's configuration",
        ),
        // A dashboard or an alarm naming a metric the code does not emit.
        (
            "MetricName: ReplyLatency",
            "MetricName: ReplyLatencey",
            "ReplyLatencey",
        ),
        (
            "\"TimeToFirstChunk\", \"function\"",
            "\"TimeToFirstChunks\", \"function\"",
            "TimeToFirstChunks",
        ),
        // A variable the function does not read (the registry's variables).
        (
            "          DATABASE_URL_SECRET_ARN: !Ref DatabaseUrlSecretArn\n          WS_MANAGEMENT_ENDPOINT",
            "          DATABASE_URL_SECRET_ARN: !Ref DatabaseUrlSecretArn\n          KONSTRUCT_AGENT_TIMOUT: \"5\"\n          WS_MANAGEMENT_ENDPOINT",
            "is given KONSTRUCT_AGENT_TIMOUT, which ws-connect does not read",
        ),
        // A function whose role may read a secret it does not use.
        (
            "Action: secretsmanager:GetSecretValue\n              Resource: !Ref DatabaseUrlSecretArn",
            "Action: secretsmanager:GetSecretValue\n              Resource: [!Ref DatabaseUrlSecretArn, !Ref PortalJwtSecretArn]",
            "they must be the same",
        ),
    ];
    for (from, to, expected) in breakages {
        assert!(original.contains(from), "{from} is in the template");
        let broken = std::env::temp_dir().join(format!("broken-{}.yaml", uuid::Uuid::new_v4()));
        std::fs::write(&broken, original.replacen(from, to, 1)).unwrap();
        let (ok, said) = validate(&broken, None).await;
        std::fs::remove_file(&broken).ok();
        assert!(!ok, "{to}: the validator must fail");
        assert!(
            said.contains(expected),
            "{to}: expected {expected} in:\n{said}"
        );
    }
}

/// Plausible values for every variable a function may be given, in the shape the code expects;
/// secrets are named by the ARNs of secrets made on the emulator.
fn sample(name: &str, secrets: &Secrets) -> String {
    match name {
        "DATABASE_URL_SECRET_ARN" => secrets.database.clone(),
        "MIGRATOR_DATABASE_URL_SECRET_ARN" => secrets.migrator.clone(),
        "PORTAL_JWT_SECRET_ARN" => secrets.portal.clone(),
        "KONSTRUCT_MODE" => "aws".into(),
        "QUEUE_URL" => "https://sqs.us-east-1.amazonaws.com/123456789012/stack-work.fifo".into(),
        "DEAD_LETTER_QUEUE_URL" => {
            "https://sqs.us-east-1.amazonaws.com/123456789012/stack-work-dead.fifo".into()
        }
        "WS_MANAGEMENT_ENDPOINT" => {
            "https://abc123.execute-api.us-east-1.amazonaws.com/prod".into()
        }
        "PORTAL_JWT_ISSUER" | "PORTAL_JWT_AUDIENCE" | "OPENAI_API_KEY_SECRET_ARN" => String::new(),
        "OPENAI_BASE_URL" => "https://api.openai.com/v1".into(),
        "AGENT_TIMEOUT_SECONDS" => "25".into(),
        "AGENT_MAX_ATTEMPTS" => "2".into(),
        "JOB_BUDGET_SECONDS" => "30".into(),
        "MAX_RECEIVE_COUNT" => "5".into(),
        "POST_BUDGET_PER_SECOND" => "2000".into(),
        "POST_BUDGET_SHARES" => "20".into(),
        "AGENT_DEFAULT_MAX_TOKENS" => "1024".into(),
        "AGENT_MAX_TOKENS" => "4096".into(),
        "REPLY_MAX_BYTES" => "65536".into(),
        "WS_AUTH_DEADLINE_SECONDS" => "10".into(),
        "REPLY_STALE_SECONDS" => "360".into(),
        "WS_MAX_SOCKETS_PER_USER" => "20".into(),
        "WS_MAX_SOCKETS_PER_CONVERSATION" => "50".into(),
        "WS_USER_RATE_LIMIT_MESSAGES" => "60".into(),
        "WS_USER_RATE_LIMIT_WINDOW_SECONDS" => "60".into(),
        "BEDROCK_MODEL_IDS" => {
            "amazon.nova-lite-v1:0,anthropic.claude-3-5-haiku-20241022-v1:0".into()
        }
        other => panic!("no sample value for {other}: add one, and check the code reads it"),
    }
}

/// The secrets the template names, made on the Secrets Manager emulator.
struct Secrets {
    database: String,
    migrator: String,
    portal: String,
}

impl Secrets {
    async fn create() -> Self {
        let client = crate::helpers::secrets::client();
        Self {
            database: crate::helpers::secrets::create(&client, "postgres://app@127.0.0.1:1/app")
                .await,
            migrator: crate::helpers::secrets::create(&client, "postgres://owner@127.0.0.1:1/app")
                .await,
            portal: crate::helpers::secrets::create(
                &client,
                "a-portal-secret-of-at-least-32-bytes-0123",
            )
            .await,
        }
    }
}

/// A Lambda Runtime API that only notes the first `next` request: the function is ready.
async fn runtime_api() -> (String, mpsc::UnboundedReceiver<()>) {
    let (ready, readies) = mpsc::unbounded_channel::<()>();
    let app = Router::new().route(
        "/2018-06-01/runtime/invocation/next",
        get(move || {
            let ready = ready.clone();
            async move {
                let _ = ready.send(());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, readies)
}

/// Starts a function binary as Lambda would, with only these variables; whether it got as far
/// as asking for its first event, and everything it wrote (its logs and errors).
async fn starts(binary: &str, variables: &[(String, String)]) -> (bool, String) {
    let bin_dir = std::env::var("KONSTRUCT_BIN_DIR")
        .expect("KONSTRUCT_BIN_DIR is not set: run the tests through `make test`, which builds the functions");
    let (api, mut readies) = runtime_api().await;
    let mut child = Command::new(format!("{bin_dir}/{binary}"))
        .env_clear()
        .envs(variables.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", &api)
        .env("AWS_LAMBDA_FUNCTION_NAME", binary)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "stream")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "group")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_SESSION_TOKEN", "token")
        .env(
            "AWS_ENDPOINT_URL_SECRETS_MANAGER",
            crate::helpers::secrets::endpoint(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {binary}: {e}"));
    let outcome = tokio::select! {
        ready = tokio::time::timeout(Duration::from_secs(15), readies.recv()) => ready.is_ok(),
        _ = child.wait() => false,
    };
    let _ = child.start_kill();
    let output = child.wait_with_output().await.unwrap();
    (
        outcome,
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test]
async fn every_function_starts_with_the_environment_the_template_gives_it() {
    let listing = std::env::temp_dir().join(format!("functions-{}.json", uuid::Uuid::new_v4()));
    let (ok, said) = validate(&template(), Some(&listing)).await;
    assert!(ok, "{said}");
    let functions: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(&listing).unwrap()).unwrap();
    std::fs::remove_file(&listing).ok();
    assert_eq!(functions.len(), 8, "{functions:?}");
    let secrets = Secrets::create().await;

    // Given only what it reads: each variable is documented as read by that function.
    for (binary, names) in &functions {
        for name in names {
            assert!(
                shared::config::variables::read_by(name, binary),
                "the template gives {binary} {name}, which shared/src/config/variables.rs \
                 does not say it reads"
            );
        }
    }
    for (binary, names) in &functions {
        let variables: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.clone(), sample(n, &secrets)))
            .collect();
        let (ready, stderr) = starts(binary, &variables).await;
        assert!(
            ready,
            "{binary} did not start with the template's environment {names:?}:\n{stderr}"
        );

        // And the check can fail: without its database the function refuses to start. The
        // migration function starts anyway and reports the problem to CloudFormation with
        // the event (see `migrate::a_missing_secret_fails_the_deploy_with_its_reason`).
        if binary == "migrate" {
            continue;
        }
        let without: Vec<(String, String)> = variables
            .iter()
            .filter(|(k, _)| k != "DATABASE_URL_SECRET_ARN")
            .cloned()
            .collect();
        let (ready, stderr) = starts(binary, &without).await;
        assert!(!ready, "{binary} started without DATABASE_URL_SECRET_ARN");
        assert!(
            stderr.contains("DATABASE_URL"),
            "{binary} names the missing variable:\n{stderr}"
        );
    }
}

/// In aws mode a function that verifies tokens says at start when the portal's issuer or
/// audience is not set (tokens are then accepted whoever issued them, for whomever).
#[tokio::test]
async fn token_verifiers_warn_at_start_when_issuer_or_audience_is_unset() {
    let secrets = Secrets::create().await;
    let base = |issuer: &str, audience: &str| -> Vec<(String, String)> {
        [
            ("KONSTRUCT_MODE", "aws"),
            ("DATABASE_URL_SECRET_ARN", secrets.database.as_str()),
            ("PORTAL_JWT_SECRET_ARN", secrets.portal.as_str()),
            (
                "WS_MANAGEMENT_ENDPOINT",
                "https://abc123.execute-api.us-east-1.amazonaws.com/prod",
            ),
            ("PORTAL_JWT_ISSUER", issuer),
            ("PORTAL_JWT_AUDIENCE", audience),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    for binary in ["ws-auth", "chat-api"] {
        let (ready, said) = starts(binary, &base("", "")).await;
        assert!(ready, "{binary}:\n{said}");
        for var in ["PORTAL_JWT_ISSUER", "PORTAL_JWT_AUDIENCE"] {
            assert!(
                said.contains(&format!("{var} is not set")),
                "{binary}:\n{said}"
            );
        }
        let (ready, said) = starts(binary, &base("https://portal.example", "konstruct")).await;
        assert!(ready, "{binary}:\n{said}");
        assert!(!said.contains("is not set"), "{binary}:\n{said}");
    }
    // A plain secret variable in a deployed function is worth a warning too.
    let mut plain = base("https://portal.example", "konstruct");
    plain.retain(|(k, _)| k != "PORTAL_JWT_SECRET_ARN");
    plain.push((
        "PORTAL_JWT_SECRET".into(),
        "a-portal-secret-of-at-least-32-bytes-0123".into(),
    ));
    let (ready, said) = starts("ws-auth", &plain).await;
    assert!(ready, "{said}");
    assert!(
        said.contains("name the secret with PORTAL_JWT_SECRET_ARN"),
        "{said}"
    );
}
