//! Property-based API check: schemathesis (PyPI, installed by `make test`) generates requests
//! from the served OpenAPI document, valid and invalid, with a valid token. No response may be
//! a 5xx, and every response must conform to the document.

use std::process::Stdio;

use shared::api::{self, ApiState};
use shared::domain::Role;

use crate::helpers::{TestDb, seed, token, verifier};

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let st = std::env::var("SCHEMATHESIS").expect(
        "SCHEMATHESIS is not set: run the tests through `make test`, which installs schemathesis",
    );
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let state = ApiState {
        db: db.clone(),
        tokens: verifier(),
        delivery: std::sync::Arc::new(shared::delivery::ManagementApi::new(
            crate::helpers::aws::sdk_config(),
        )),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, api::router(state)).await.unwrap();
    });

    let output = tokio::process::Command::new(st)
        .args([
            "run",
            &format!("http://{address}/api/portal/chat/openapi.json"),
            "--header",
            &format!(
                "Authorization: Bearer {}",
                token(s.user, Role::CustomerOperator)
            ),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance,response_headers_conformance,negative_data_rejection",
            "--max-examples",
            "60",
            "--generation-database",
            "none",
            "--no-color",
            "--workers",
            "1",
        ])
        // Its crash cache (`.schemathesis/`) goes to a directory of its own, not the tree.
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run schemathesis");
    server.abort();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "schemathesis failed:\n{report}");
}
