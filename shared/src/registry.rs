//! What the code defines that the deployment must match, as one JSON document: the Lambda
//! functions, the WebSocket routes and the function serving each, every variable and who reads
//! it, and the metrics. `infra/validate_template.py --registry` holds template.yaml to it; the
//! template test writes it from here, and `konstruct-local registry` prints it.

use serde_json::{Map, Value, json};

use crate::config::variables::{LAMBDAS, VARIABLES};
use crate::telemetry::{COUNTERS, HISTOGRAMS, NAMESPACE};
use crate::ws::routes::ROUTES;

/// The registry: `functions` (crate names, one Lambda each), `routes` (route key → function),
/// `variables` (name → the binaries that read it), `metrics` (`namespace`, `counters`,
/// `histograms`).
pub fn document() -> Value {
    let routes: Map<String, Value> = ROUTES
        .iter()
        .map(|(key, route)| ((*key).to_owned(), json!(route.function())))
        .collect();
    let variables: Map<String, Value> = VARIABLES
        .iter()
        .flat_map(|v| {
            v.names
                .iter()
                .map(|name| ((*name).to_owned(), json!(v.read_by)))
        })
        .collect();
    json!({
        "functions": LAMBDAS,
        "routes": routes,
        "variables": variables,
        "metrics": {
            "namespace": NAMESPACE,
            "counters": COUNTERS,
            "histograms": HISTOGRAMS,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_served_by_a_listed_function() {
        let registry = document();
        let functions = registry["functions"].as_array().unwrap();
        for (key, function) in registry["routes"].as_object().unwrap() {
            assert!(functions.contains(function), "{key} → {function}");
        }
        assert_eq!(registry["routes"]["$default"], "ws-message");
        assert_eq!(registry["variables"]["DATABASE_URL"][0], "ws-connect");
    }
}
