//! `GET /metrics`: the metrics the functions send to CloudWatch on AWS (`shared::telemetry`),
//! in Prometheus' text format, for a Prometheus on this machine to scrape.

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the Prometheus recorder for this process and serves what it holds.
pub fn router() -> Result<Router, Box<dyn std::error::Error + Send + Sync>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    shared::telemetry::describe();
    Ok(Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    ))
}
