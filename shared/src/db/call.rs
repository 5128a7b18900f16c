//! A call of one of the schema's functions as one simple query (no prepare round trip).

/// Any text as an SQL literal whatever `standard_conforming_strings` says: an escape string
/// (`E'…'`), its backslashes and quotes doubled. A NUL (which no Postgres text can hold) ends
/// a simple query's text early, inside the literal: the statement then fails to parse.
fn escaped(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A call of one of the schema's functions, its arguments written as SQL literals, for
/// [`Db::call`]: `select * from f(E'…'::text, '…'::uuid, 3::bigint, null::uuid)`. Each argument
/// carries its type, so the call resolves to the function the migration declares.
#[derive(Debug, Clone)]
pub struct Call {
    sql: String,
    arguments: usize,
}

impl Call {
    pub fn new(function: &'static str) -> Self {
        Self {
            sql: format!("select * from {function}("),
            arguments: 0,
        }
    }

    fn argument(mut self, literal: &str, type_name: &str) -> Self {
        if self.arguments > 0 {
            self.sql.push_str(", ");
        }
        self.sql.push_str(literal);
        self.sql.push_str("::");
        self.sql.push_str(type_name);
        self.arguments += 1;
        self
    }

    pub fn text(self, value: &str) -> Self {
        self.argument(&escaped(value), "text")
    }

    pub fn optional_text(self, value: Option<&str>) -> Self {
        match value {
            Some(value) => self.text(value),
            None => self.argument("null", "text"),
        }
    }

    /// One of the domain's ids (their `Display` is the UUID's).
    pub fn uuid(self, value: impl std::fmt::Display) -> Self {
        self.argument(&escaped(&value.to_string()), "uuid")
    }

    pub fn optional_uuid(self, value: Option<impl std::fmt::Display>) -> Self {
        match value {
            Some(value) => self.uuid(value),
            None => self.argument("null", "uuid"),
        }
    }

    pub fn bigint(self, value: i64) -> Self {
        self.argument(&value.to_string(), "bigint")
    }

    pub fn optional_bigint(self, value: Option<i64>) -> Self {
        match value {
            Some(value) => self.bigint(value),
            None => self.argument("null", "bigint"),
        }
    }

    /// A finite number (Rust writes it in full, which Postgres parses exactly).
    pub fn float(self, value: f64) -> Self {
        self.argument(&escaped(&value.to_string()), "float8")
    }

    pub(super) fn sql(&self) -> String {
        format!("{})", self.sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_writes_each_argument_as_a_typed_literal() {
        let id = uuid::Uuid::nil();
        let call = Call::new("f")
            .text(r"it's a \ back\slash")
            .uuid(id)
            .optional_uuid(None::<uuid::Uuid>)
            .bigint(-3)
            .optional_text(None)
            .float(2.5);
        assert_eq!(
            call.sql(),
            format!(
                "select * from f(E'it''s a \\\\ back\\\\slash'::text, E'{id}'::uuid, null::uuid, \
                 -3::bigint, null::text, E'2.5'::float8)"
            )
        );
    }
}
