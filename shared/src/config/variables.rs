//! Every variable the system reads, who reads it and what it means: the one place they are
//! documented. The README's configuration table is [`markdown_table`]'s output (a test fails
//! when they differ); every read goes through [`super::raw`], which refuses (in debug builds,
//! so in every test) a name that is not here (`konstruct-local`'s flag variables, read by clap,
//! are checked by its own test); and the template check fails when a function is given a variable this table does not
//! say it reads. (The runtime's `_X_AMZN_TRACE_ID` and the AWS SDK's own variables are not
//! configuration and not here.)

/// One row of the table: variables read together, by the same binaries.
#[derive(Debug)]
pub struct Variable {
    pub names: &'static [&'static str],
    /// The binaries (crates under `functions/`) that read them.
    pub read_by: &'static [&'static str],
    /// What an unset (or blank) variable reads as: the one place a default is written, applied
    /// by every read ([`super::optional`]) and shown in the README's table.
    pub defaults: &'static [(&'static str, &'static str)],
    /// What they mean, in Markdown.
    pub meaning: &'static str,
}

const ROUTE_FUNCTIONS: &[&str] = &[
    "ws-connect",
    "ws-auth",
    "ws-message",
    "ws-disconnect",
    "ws-sweep",
];
const DATABASE: &[&str] = &[
    "ws-connect",
    "ws-auth",
    "ws-message",
    "ws-disconnect",
    "ws-sweep",
    "orchestrator",
    "chat-api",
    "konstruct-local",
];
/// The Lambda functions: each a crate under `functions/` and one function of template.yaml.
pub const LAMBDAS: &[&str] = &[
    "ws-connect",
    "ws-auth",
    "ws-message",
    "ws-disconnect",
    "ws-sweep",
    "orchestrator",
    "chat-api",
    "migrate",
];
const ALL_FUNCTIONS: &[&str] = &[
    "ws-connect",
    "ws-auth",
    "ws-message",
    "ws-disconnect",
    "ws-sweep",
    "orchestrator",
    "chat-api",
    "migrate",
    "konstruct-local",
];
const TOKENS: &[&str] = &["ws-auth", "chat-api", "konstruct-local"];
const ORCHESTRATOR: &[&str] = &["orchestrator", "konstruct-local"];
const LOCAL: &[&str] = &["konstruct-local"];

pub const VARIABLES: &[Variable] = &[
    Variable {
        names: &["DATABASE_URL"],
        read_by: DATABASE,
        defaults: &[],
        meaning: "`postgres://…` as the runtime role: neither superuser nor `BYPASSRLS`, owning nothing (not a table, the schema or the database, nor a role that does); the first transaction of each process checks, and the process refuses to work otherwise, naming the problem",
    },
    Variable {
        names: &["MIGRATOR_DATABASE_URL"],
        read_by: &["migrate", "konstruct-local"],
        defaults: &[],
        meaning: "the role that owns the schema, for `konstruct-local migrate` and the migration function; refused if superuser or `BYPASSRLS`",
    },
    Variable {
        names: &[
            "DATABASE_URL_SECRET_ARN",
            "MIGRATOR_DATABASE_URL_SECRET_ARN",
            "PORTAL_JWT_SECRET_ARN",
            "OPENAI_API_KEY_SECRET_ARN",
        ],
        read_by: LAMBDAS,
        defaults: &[],
        meaning: "instead of the plain variable (setting both is refused): the Secrets Manager secret holding the value, read at start and read again (at most every 5 s) when it fails to authenticate (a token signature, a database login, a 401 from the model), so a rotation needs no redeploy. A database secret may be a URL or the JSON RDS keeps (`username`, `password`, `host`, `port`, `dbname`). In aws mode a plain secret variable logs a warning",
    },
    Variable {
        names: &["DATABASE_MAX_CONNECTIONS"],
        read_by: ALL_FUNCTIONS,
        defaults: &[("DATABASE_MAX_CONNECTIONS", "2")],
        meaning: "pool size per process (small: Lambdas keep Postgres's connection count small)",
    },
    Variable {
        names: &["DATABASE_POOLED"],
        read_by: ALL_FUNCTIONS,
        defaults: &[],
        meaning: "`true` when `DATABASE_URL` reaches Postgres through a pooler that multiplexes transactions (RDS Proxy, PgBouncer in transaction mode): statements are prepared unnamed inside their transaction, so no session outlives it and the pooler never pins (one more round trip per statement); default `true` in aws mode, `false` otherwise",
    },
    Variable {
        names: &["DATABASE_LOCK_TIMEOUT_MS"],
        read_by: ALL_FUNCTIONS,
        defaults: &[("DATABASE_LOCK_TIMEOUT_MS", "3000")],
        meaning: "how long a statement may wait for a lock before its transaction fails (`lock_timeout`, set in every transaction)",
    },
    Variable {
        names: &["DATABASE_STATEMENT_TIMEOUT_MS"],
        read_by: ALL_FUNCTIONS,
        defaults: &[("DATABASE_STATEMENT_TIMEOUT_MS", "5000")],
        meaning: "how long a statement may run before its transaction fails (`statement_timeout`, set in every transaction)",
    },
    Variable {
        names: &["PORTAL_JWT_SECRET"],
        read_by: TOKENS,
        defaults: &[],
        meaning: "HS256 secret of portal tokens, at least 32 bytes",
    },
    Variable {
        names: &["PORTAL_JWT_ISSUER", "PORTAL_JWT_AUDIENCE"],
        read_by: TOKENS,
        defaults: &[],
        meaning: "when set, tokens must carry exactly this `iss` / `aud`; in aws mode a function that verifies tokens logs a warning at start when one is unset",
    },
    Variable {
        names: &["KONSTRUCT_MODE"],
        read_by: ALL_FUNCTIONS,
        defaults: &[],
        meaning: "`aws` or `local`",
    },
    Variable {
        names: &["QUEUE_URL"],
        read_by: &["ws-message", "orchestrator", "konstruct-local"],
        defaults: &[],
        meaning: "aws mode: the SQS FIFO queue URL (must end in `.fifo`)",
    },
    Variable {
        names: &["WS_MANAGEMENT_ENDPOINT"],
        read_by: ROUTE_FUNCTIONS,
        defaults: &[],
        meaning: "aws mode, optional: `https://{api-id}.execute-api.{region}.amazonaws.com/{stage}`; otherwise taken from each event",
    },
    Variable {
        names: &["REDIS_URL"],
        read_by: &["ws-message", "orchestrator", "konstruct-local"],
        defaults: &[],
        meaning: "local mode: `redis://…`",
    },
    Variable {
        names: &["KONSTRUCT_REDIS_PREFIX"],
        read_by: &["ws-message", "konstruct-local"],
        defaults: &[("KONSTRUCT_REDIS_PREFIX", "konstruct:")],
        meaning: "local mode: prefix of the job stream's keys (one Redis can serve several stacks)",
    },
    Variable {
        names: &["WS_RATE_LIMIT_MESSAGES", "WS_RATE_LIMIT_WINDOW_SECONDS"],
        read_by: &["ws-auth", "ws-message", "konstruct-local"],
        defaults: &[
            ("WS_RATE_LIMIT_MESSAGES", "20"),
            ("WS_RATE_LIMIT_WINDOW_SECONDS", "10"),
        ],
        meaning: "`message` frames one connection may send per window (in seconds), and as many `auth` frames in a window of their own; more get `rate_limited`",
    },
    Variable {
        names: &[
            "WS_USER_RATE_LIMIT_MESSAGES",
            "WS_USER_RATE_LIMIT_WINDOW_SECONDS",
        ],
        read_by: &["ws-auth", "ws-message", "konstruct-local"],
        defaults: &[
            ("WS_USER_RATE_LIMIT_MESSAGES", "60"),
            ("WS_USER_RATE_LIMIT_WINDOW_SECONDS", "60"),
        ],
        meaning: "messages one user may send across all their sockets in a sliding window (in seconds), and as many `auth` frames in a fixed one; reconnecting or opening more sockets does not reset it; more get `rate_limited`",
    },
    Variable {
        names: &["WS_MAX_SOCKETS_PER_USER", "WS_MAX_SOCKETS_PER_CONVERSATION"],
        read_by: &["ws-auth", "konstruct-local"],
        defaults: &[
            ("WS_MAX_SOCKETS_PER_USER", "20"),
            ("WS_MAX_SOCKETS_PER_CONVERSATION", "50"),
        ],
        meaning: "authenticated sockets one user may have open in a tenant and one conversation may have; over either, `auth` gets `rate_limited` and the socket is closed",
    },
    Variable {
        names: &["REPLY_STALE_SECONDS"],
        read_by: &["ws-sweep"],
        defaults: &[("REPLY_STALE_SECONDS", "360")],
        meaning: "seconds a streaming reply may go unwritten before the sweeper ends it `failed` and tells its sockets (its producer is gone); longer than the orchestrator's timeout",
    },
    Variable {
        names: &["WS_AUTH_DEADLINE_SECONDS"],
        read_by: &["ws-sweep"],
        defaults: &[("WS_AUTH_DEADLINE_SECONDS", "10")],
        meaning: "seconds a socket may stay unauthenticated; the sweeper, every minute, closes and forgets older ones",
    },
    Variable {
        names: &["OPENAI_BASE_URL", "OPENAI_API_KEY"],
        read_by: ORCHESTRATOR,
        defaults: &[("OPENAI_BASE_URL", "https://api.openai.com/v1")],
        meaning: "the OpenAI-compatible endpoint (OpenAI's by default; Ollama, vLLM, LiteLLM work too) and its key (optional for local servers)",
    },
    Variable {
        names: &["AGENT_TIMEOUT_SECONDS", "AGENT_MAX_ATTEMPTS"],
        read_by: ORCHESTRATOR,
        defaults: &[("AGENT_TIMEOUT_SECONDS", "60"), ("AGENT_MAX_ATTEMPTS", "3")],
        meaning: "per-attempt agent timeout (seconds) and attempts per job",
    },
    Variable {
        names: &["JOB_BUDGET_SECONDS"],
        read_by: ORCHESTRATOR,
        defaults: &[("JOB_BUDGET_SECONDS", "30")],
        meaning: "on Lambda: the time a job may need; none starts with less left before the invocation's deadline",
    },
    Variable {
        names: &["MAX_RECEIVE_COUNT"],
        read_by: ORCHESTRATOR,
        defaults: &[("MAX_RECEIVE_COUNT", "5")],
        meaning: "attempts at a job before it is given up: receives, less those the orchestrator sent back unstarted for want of time; the user hears of a failure that may pass only on the last. On Lambda the orchestrator then moves the job to `DEAD_LETTER_QUEUE_URL` (the queue's own `maxReceiveCount` is a larger backstop); the local worker dead-letters after it",
    },
    Variable {
        names: &["DEAD_LETTER_QUEUE_URL"],
        read_by: ORCHESTRATOR,
        defaults: &[],
        meaning: "aws mode, optional: the FIFO dead-letter queue the orchestrator moves a job to after its last attempt; unset, such a job is left to the work queue's redrive",
    },
    Variable {
        names: &["AGENT_DEFAULT_MAX_TOKENS", "AGENT_MAX_TOKENS"],
        read_by: ORCHESTRATOR,
        defaults: &[
            ("AGENT_DEFAULT_MAX_TOKENS", "1024"),
            ("AGENT_MAX_TOKENS", "4096"),
        ],
        meaning: "output tokens a reply may use when its agent sets no `max_tokens` (at most `AGENT_MAX_TOKENS`, lowered to it when that alone is set lower), and the most any agent's setting may ask for",
    },
    Variable {
        names: &["REPLY_MAX_BYTES"],
        read_by: ORCHESTRATOR,
        defaults: &[("REPLY_MAX_BYTES", "65536")],
        meaning: "a reply is cut at this size (on a character boundary) and ends with `stop_reason: \"length\"`",
    },
    Variable {
        names: &["BEDROCK_MODEL_IDS"],
        read_by: ORCHESTRATOR,
        defaults: &[],
        meaning: "comma-separated Bedrock model ids agents may use; any other is refused (`agent_failed`). Unset allows any (local runs); the template always sets it",
    },
    Variable {
        names: &["FANOUT_CONCURRENCY", "POST_TIMEOUT_MS"],
        read_by: ORCHESTRATOR,
        defaults: &[("FANOUT_CONCURRENCY", "8"), ("POST_TIMEOUT_MS", "3000")],
        meaning: "aws mode: posts to one conversation's sockets at once, and how long one post may take (ms) before it counts as failed",
    },
    Variable {
        names: &["POST_BUDGET_PER_SECOND", "POST_BUDGET_SHARES"],
        read_by: ORCHESTRATOR,
        defaults: &[("POST_BUDGET_SHARES", "1")],
        meaning: "aws mode, optional: the deployment's budget of connection-management posts a second (the account's quota is shared with all its other traffic), shared evenly by this many orchestrator instances (the event source's maximum concurrency). A post waits for its process's share; while posts wait, streamed chunks coalesce (at most one flush a second). Unset: no budget",
    },
    Variable {
        names: &["CORS_ALLOWED_ORIGINS"],
        read_by: &["chat-api"],
        defaults: &[],
        meaning: "comma-separated origins allowed to call the REST API from a browser, or `*`; unset means same-origin only",
    },
    Variable {
        names: &["KONSTRUCT_LISTEN"],
        read_by: LOCAL,
        defaults: &[("KONSTRUCT_LISTEN", "127.0.0.1:8080")],
        meaning: "`serve`: the address to listen on (`--listen`)",
    },
    Variable {
        names: &["KONSTRUCT_LAMBDA_ENDPOINT"],
        read_by: LOCAL,
        defaults: &[],
        meaning: "`serve`: send route events to the functions under `cargo lambda watch` at this URL (`--lambda-endpoint`) instead of handling them in-process",
    },
    Variable {
        names: &["KONSTRUCT_WS_MAX_SECONDS", "KONSTRUCT_WS_IDLE_SECONDS"],
        read_by: LOCAL,
        defaults: &[
            ("KONSTRUCT_WS_MAX_SECONDS", "7200"),
            ("KONSTRUCT_WS_IDLE_SECONDS", "600"),
        ],
        meaning: "`serve`: a socket is closed (1001) after this long (`--max-connection`; API Gateway's 2 hours) and after this long without a client frame (`--idle-timeout`; its 10 minutes)",
    },
];

/// What `name` reads as when it is unset or blank, if it has a default.
pub fn default_of(name: &str) -> Option<&'static str> {
    VARIABLES
        .iter()
        .flat_map(|v| v.defaults.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, value)| *value)
}

/// Whether `name` is in the table.
pub fn documented(name: &str) -> bool {
    VARIABLES.iter().any(|v| v.names.contains(&name))
}

/// Whether the table says `binary` reads `name`.
pub fn read_by(name: &str, binary: &str) -> bool {
    VARIABLES
        .iter()
        .any(|v| v.names.contains(&name) && v.read_by.contains(&binary))
}

/// The README's configuration table.
pub fn markdown_table() -> String {
    let mut table = String::from("| variable | read by | default | meaning |\n|---|---|---|---|\n");
    for variable in VARIABLES {
        let names: Vec<String> = variable.names.iter().map(|n| format!("`{n}`")).collect();
        let defaults: Vec<String> = variable
            .names
            .iter()
            .map(|name| default_of(name).map_or_else(|| "–".to_owned(), |v| format!("`{v}`")))
            .collect();
        let defaults = if variable.defaults.is_empty() {
            String::new()
        } else {
            defaults.join(", ")
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            names.join(", "),
            readers(variable.read_by),
            defaults,
            variable.meaning
        ));
    }
    table
}

/// `ws-*` for the five route functions together, the others by name.
fn readers(read_by: &[&str]) -> String {
    let all_routes = ROUTE_FUNCTIONS.iter().all(|r| read_by.contains(r));
    let mut names: Vec<&str> = Vec::new();
    if all_routes {
        names.push("ws-*");
    }
    names.extend(
        read_by
            .iter()
            .filter(|b| !(all_routes && ROUTE_FUNCTIONS.contains(b))),
    );
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_configuration_table_is_this_table() {
        let readme = include_str!("../../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from shared/src/config/variables.rs; \
             the table, as the README should have it:\n\n{table}"
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "is read but not documented")]
    fn reading_a_variable_not_in_the_table_fails() {
        super::super::optional(
            &|_: &str| Some("x".to_owned()),
            "KONSTRUCT_NOT_IN_THE_TABLE",
        );
    }

    #[test]
    fn every_reader_is_a_lambda_or_the_local_runtime() {
        assert_eq!(ALL_FUNCTIONS[..LAMBDAS.len()], *LAMBDAS);
        assert_eq!(ALL_FUNCTIONS[LAMBDAS.len()..], ["konstruct-local"]);
        for variable in VARIABLES {
            for reader in variable.read_by {
                assert!(
                    ALL_FUNCTIONS.contains(reader),
                    "{reader} of {:?}",
                    variable.names
                );
            }
        }
    }

    #[test]
    fn every_default_reads_and_unset_reads_as_the_default_set() {
        use super::super::orchestrator::OrchestratorSettings;
        use super::super::routes::{Limits, SocketCaps, auth_deadline};
        use super::super::{DatabaseConfig, redis_prefix};
        let url = |name: &str| {
            (name == "DATABASE_URL").then(|| "postgres://app@localhost/konstruct".to_owned())
        };
        let unset = |name: &str| url(name);
        let set = |name: &str| url(name).or_else(|| default_of(name).map(str::to_owned));
        assert_eq!(
            OrchestratorSettings::from_lookup(unset).unwrap(),
            OrchestratorSettings::from_lookup(set).unwrap()
        );
        assert_eq!(
            Limits::from_lookup(unset).unwrap(),
            Limits::from_lookup(set).unwrap()
        );
        assert_eq!(
            SocketCaps::from_lookup(unset).unwrap(),
            SocketCaps::from_lookup(set).unwrap()
        );
        assert_eq!(auth_deadline(unset).unwrap(), auth_deadline(set).unwrap());
        assert_eq!(redis_prefix(&unset), redis_prefix(&set));
        let (a, b) = (
            DatabaseConfig::from_lookup(unset).unwrap(),
            DatabaseConfig::from_lookup(set).unwrap(),
        );
        assert_eq!(
            (a.max_connections, a.timeouts),
            (b.max_connections, b.timeouts)
        );
        assert_eq!(Limits::default().connection.messages, 20);
    }

    #[test]
    fn every_default_belongs_to_its_row() {
        for variable in VARIABLES {
            for (name, _) in variable.defaults {
                assert!(variable.names.contains(name), "{name}'s default");
            }
        }
    }

    #[test]
    fn every_variable_is_named_once_and_read_by_someone() {
        let mut names: Vec<&str> = VARIABLES
            .iter()
            .flat_map(|v| v.names.iter().copied())
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a variable is in two rows");
        assert!(VARIABLES.iter().all(|v| !v.read_by.is_empty()));
    }
}
