//! Secrets Manager as the tests meet it: moto's server mode through the real SDK client.

use aws_config::SdkConfig;

use crate::helpers::aws::sdk_config;

pub fn endpoint() -> String {
    std::env::var("MOTO_ENDPOINT")
        .expect("MOTO_ENDPOINT is not set: run the tests through `make test`, which starts moto")
}

pub fn config() -> SdkConfig {
    sdk_config().to_builder().endpoint_url(endpoint()).build()
}

pub fn client() -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(&config())
}

/// A secret of a fresh name holding `value`; its ARN.
pub async fn create(client: &aws_sdk_secretsmanager::Client, value: &str) -> String {
    client
        .create_secret()
        .name(format!("konstruct/test/{}", uuid::Uuid::new_v4().simple()))
        .secret_string(value)
        .send()
        .await
        .expect("create a secret on moto")
        .arn
        .expect("a created secret has an ARN")
}

pub async fn rotate(client: &aws_sdk_secretsmanager::Client, arn: &str, value: &str) {
    client
        .put_secret_value()
        .secret_id(arn)
        .secret_string(value)
        .send()
        .await
        .expect("put a new secret value");
}
