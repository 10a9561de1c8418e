//! The one place SQL text of a peer's reaches a receiver's statements: a PostgreSQL expression
//! (a column default, a CHECK constraint, a generated column, an index's expression or
//! predicate), as the sender's catalog prints it (`pg_get_expr`). It is written into a statement
//! only after [`check`] has read it token by token and found nothing but values, column names,
//! operators, casts and calls of [`FUNCTIONS`]: no statement separator, comment, dollar or
//! escape string, subquery, or call of any other function. PostgreSQL refuses subqueries in all
//! of these places besides; what it does not refuse is a call, which is why calls are listed.
//!
//! An expression that does not pass is not created; the pull says which and why, and the
//! operator adds it by hand if they trust it.

/// Longest expression read (a generated `tsvector` over a few columns is well under it).
pub const MAX_EXPRESSION: usize = 16 * 1024;

/// Functions an expression may call: immutable or stable ones that read nothing but their
/// arguments (and the clock), write nothing, and cannot wait. Names are as `pg_get_expr` prints
/// them, without a schema (or in `pg_catalog`/`public`).
pub const FUNCTIONS: &[&str] = &[
    // Text.
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "btrim",
    "ltrim",
    "rtrim",
    "substr",
    "substring",
    "left",
    "right",
    "lpad",
    "rpad",
    "replace",
    "translate",
    "split_part",
    "strpos",
    "concat",
    "concat_ws",
    "repeat",
    "reverse",
    "starts_with",
    "regexp_replace",
    "regexp_match",
    "regexp_like",
    "format",
    "md5",
    "ascii",
    "chr",
    "to_hex",
    "encode",
    "decode",
    "unaccent",
    "normalize",
    "quote_literal",
    // Numbers.
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "sign",
    "mod",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "log10",
    "div",
    "width_bucket",
    "num_nulls",
    "num_nonnulls",
    // Conditionals.
    "coalesce",
    "nullif",
    "greatest",
    "least",
    // Time.
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "date_trunc",
    "date_part",
    "date_bin",
    "extract",
    "age",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "timezone",
    "isfinite",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    // Identifiers and sequences (a sequence of the receiver's own).
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "nextval",
    // Full text search.
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "setweight",
    "strip",
    "array_to_tsvector",
    // Arrays.
    "array_length",
    "array_lower",
    "array_upper",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_to_string",
    "string_to_array",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "cardinality",
    // JSON.
    "to_json",
    "to_jsonb",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "json_typeof",
    "jsonb_typeof",
    "json_array_length",
    "jsonb_array_length",
    "jsonb_strip_nulls",
    "jsonb_path_exists",
    "jsonb_path_match",
    "json_object",
    "jsonb_object",
    "row_to_json",
    // Ranges.
    "lower_inc",
    "upper_inc",
    "lower_inf",
    "upper_inf",
    "isempty",
    "range_merge",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
    "int4multirange",
    "int8multirange",
    "nummultirange",
    "tsmultirange",
    "tstzmultirange",
    "datemultirange",
    // Network addresses.
    "family",
    "host",
    "hostmask",
    "masklen",
    "netmask",
    "network",
    "broadcast",
    "inet_same_family",
    // Casts written as calls.
    "date",
    "text",
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "numeric",
    "bool",
    "varchar",
    "bpchar",
    "timestamp",
    "timestamptz",
    "interval",
    "time",
    "timetz",
    "jsonb",
    "json",
    "uuid",
    "inet",
    "cidr",
    "macaddr",
    "citext",
    "ltree",
    "hstore",
    "nlevel",
    "subpath",
    "subltree",
    "akeys",
    "avals",
    "exist",
    "defined",
];

/// Words that open a statement or a subquery: never part of a travelling expression.
const FORBIDDEN_WORDS: &[&str] = &[
    "select",
    "values",
    "table",
    "exists",
    "with",
    "insert",
    "update",
    "delete",
    "merge",
    "returning",
    "into",
    "lateral",
    "operator",
    "union",
    "intersect",
    "except",
];

/// One token of an expression.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// An unquoted word, lowercased.
    Word(String),
    /// A quoted identifier, as written between its quotes.
    Quoted(String),
    /// A string constant.
    Str,
    /// A number.
    Number,
    /// An operator.
    Operator(String),
    /// `(`, `)`, `[`, `]`, `,`, `.`, `::`, `:`.
    Punct(&'static str),
}

/// Why an expression does not travel.
pub type Refusal = String;

fn tokens(text: &str) -> Result<Vec<Token>, Refusal> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'\'' => {
                // A standard string: '' is a quote inside it; a backslash is a character.
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err("an unterminated string".into()),
                        Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                out.push(Token::Str);
            }
            b'"' => {
                let mut name = String::new();
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err("an unterminated quoted name".into()),
                        Some(b'"') if bytes.get(i + 1) == Some(&b'"') => {
                            name.push('"');
                            i += 2;
                        }
                        Some(b'"') => break,
                        Some(_) => {
                            let ch = text[i..].chars().next().unwrap_or('\0');
                            name.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                i += 1;
                out.push(Token::Quoted(name));
            }
            b'0'..=b'9' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.' || bytes[i] == b'_')
                {
                    // An exponent's sign belongs to the number.
                    if (bytes[i] == b'e' || bytes[i] == b'E')
                        && matches!(bytes.get(i + 1), Some(b'+' | b'-'))
                    {
                        i += 1;
                    }
                    i += 1;
                }
                out.push(Token::Number);
            }
            b'(' | b')' | b'[' | b']' | b',' => {
                out.push(Token::Punct(match c {
                    b'(' => "(",
                    b')' => ")",
                    b'[' => "[",
                    b']' => "]",
                    _ => ",",
                }));
                i += 1;
            }
            b'.' => {
                if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_')
                    {
                        i += 1;
                    }
                    out.push(Token::Number);
                } else {
                    out.push(Token::Punct("."));
                    i += 1;
                }
            }
            b':' => {
                if bytes.get(i + 1) == Some(&b':') {
                    out.push(Token::Punct("::"));
                    i += 2;
                } else {
                    out.push(Token::Punct(":"));
                    i += 1;
                }
            }
            b';' => return Err("a statement separator".into()),
            b'$' => return Err("a dollar-quoted string or a parameter".into()),
            b'\\' => return Err("a backslash outside a string".into()),
            b'+' | b'-' | b'*' | b'/' | b'<' | b'>' | b'=' | b'~' | b'!' | b'@' | b'#' | b'%'
            | b'^' | b'&' | b'|' | b'`' | b'?' => {
                let start = i;
                while i < bytes.len()
                    && matches!(
                        bytes[i],
                        b'+' | b'-'
                            | b'*'
                            | b'/'
                            | b'<'
                            | b'>'
                            | b'='
                            | b'~'
                            | b'!'
                            | b'@'
                            | b'#'
                            | b'%'
                            | b'^'
                            | b'&'
                            | b'|'
                            | b'`'
                            | b'?'
                    )
                {
                    i += 1;
                }
                let op = &text[start..i];
                if op.contains("--") || op.contains("/*") {
                    return Err("a comment".into());
                }
                out.push(Token::Operator(op.to_owned()));
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                // A prefixed string (E'..', U&'..', B'..', X'..') reads escapes differently.
                if matches!(bytes.get(i), Some(b'\'' | b'&')) {
                    return Err("a prefixed string constant".into());
                }
                out.push(Token::Word(text[start..i].to_lowercase()));
            }
            _ => return Err(format!("the character {:?}", c as char)),
        }
    }
    Ok(out)
}

/// Checks that `text` is an expression a receiver may write into its own statement (see the
/// module's comment); the refusal says what was found.
pub fn check(text: &str) -> Result<(), Refusal> {
    if text.len() > MAX_EXPRESSION {
        return Err(format!("longer than {MAX_EXPRESSION} bytes"));
    }
    if text.contains('\0') {
        return Err("a NUL byte".into());
    }
    let tokens = tokens(text)?;
    if tokens.is_empty() {
        return Err("nothing".into());
    }
    let mut depth: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct(open @ ("(" | "[")) => depth.push(open),
            Token::Punct(close @ (")" | "]")) => {
                let expected = if *close == ")" { "(" } else { "[" };
                if depth.pop() != Some(expected) {
                    return Err("unbalanced brackets".into());
                }
            }
            Token::Punct(",") if depth.is_empty() => {
                return Err("a list where one expression goes".into());
            }
            Token::Word(word) if FORBIDDEN_WORDS.contains(&word.as_str()) => {
                // `WITH TIME ZONE` in a type name is fine; `WITH` anywhere else is not.
                let time_zone = word == "with"
                    && tokens.get(i + 1) == Some(&Token::Word("time".into()))
                    && tokens.get(i + 2) == Some(&Token::Word("zone".into()));
                if !time_zone {
                    return Err(format!("the word {}", word.to_uppercase()));
                }
            }
            Token::Word(_) | Token::Quoted(_) => {
                // A name, maybe qualified: a call when `(` follows.
                let mut parts = vec![&tokens[i]];
                while tokens.get(i + 1) == Some(&Token::Punct("."))
                    && matches!(tokens.get(i + 2), Some(Token::Word(_) | Token::Quoted(_)))
                {
                    parts.push(&tokens[i + 2]);
                    i += 2;
                }
                if tokens.get(i + 1) == Some(&Token::Punct("(")) {
                    check_call(&parts, tokens.get(i.wrapping_sub(parts.len() * 2 - 1)))?;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if !depth.is_empty() {
        return Err("unbalanced brackets".into());
    }
    Ok(())
}

/// A call of `parts` (a name, maybe qualified). `before` is the token before the name: after
/// `::` or `AS` the name is a type and `(` holds its modifiers.
fn check_call(parts: &[&Token], before: Option<&Token>) -> Result<(), Refusal> {
    let name = |token: &Token| match token {
        Token::Word(word) => word.clone(),
        Token::Quoted(name) => name.clone(),
        _ => String::new(),
    };
    let last = parts.last().map(|t| name(t)).unwrap_or_default();
    let after_cast = matches!(before, Some(Token::Punct("::")))
        || matches!(before, Some(Token::Word(w)) if w == "as");
    if after_cast {
        return Ok(());
    }
    // Keywords that take a parenthesised operand.
    if parts.len() == 1
        && matches!(
            parts[0],
            Token::Word(w) if matches!(
                w.as_str(),
                "in" | "any" | "all" | "some" | "cast" | "row" | "array" | "and" | "or" | "not"
                    | "when" | "then" | "else" | "is" | "like" | "ilike" | "between" | "coalesce"
                    | "nullif" | "greatest" | "least" | "extract" | "substring" | "position"
                    | "trim" | "overlay" | "normalize" | "collate" | "zone" | "distinct" | "from"
                    | "varying" | "precision" | "time" | "timestamp" | "interval" | "numeric"
                    | "decimal" | "char" | "character" | "varchar" | "bit"
            )
        )
    {
        return Ok(());
    }
    let schema_ok = match parts.len() {
        1 => true,
        2 => matches!(name(parts[0]).as_str(), "pg_catalog" | "public"),
        _ => false,
    };
    if schema_ok && FUNCTIONS.contains(&last.as_str()) {
        return Ok(());
    }
    let written: Vec<String> = parts.iter().map(|t| name(t)).collect();
    Err(format!(
        "a call of {}(), which dbsync does not run from a peer's schema",
        written.join(".")
    ))
}

/// An operator name a receiver may write (of an exclusion constraint): operator characters
/// only, no comment.
pub fn check_operator(op: &str) -> Result<(), Refusal> {
    let ok = !op.is_empty()
        && op.len() <= 63
        && op.bytes().all(|b| b"+-*/<>=~!@#%^&|`?".contains(&b))
        && !op.contains("--")
        && !op.contains("/*");
    if ok {
        Ok(())
    } else {
        Err(format!("{op:?} is not an operator"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_catalogs_print_passes() {
        for ok in [
            "0",
            "(-1)",
            "'active'::character varying",
            "'{}'::jsonb",
            "'it''s'::text",
            "NULL::integer",
            "now()",
            "CURRENT_TIMESTAMP",
            "gen_random_uuid()",
            "nextval('orders_id_seq'::regclass)",
            "(now() + '1 day'::interval)",
            "(price > (0)::numeric)",
            "((status)::text = ANY ((ARRAY['new'::character varying, 'paid'::character varying])::text[]))",
            "(char_length((name)::text) > 0)",
            "((lower((email)::text) ~~ '%@%'::text) AND (email IS NOT NULL))",
            "to_tsvector('english'::regconfig, ((COALESCE(title, ''::text) || ' '::text) || COALESCE(body, ''::text)))",
            "(VALUE >= 1900)",
            "(deleted_at IS NULL)",
            "CASE WHEN (qty > 10) THEN 'bulk'::text ELSE 'unit'::text END",
            "((price * (qty)::numeric))",
            "(lower(during) < '2030-01-01 00:00:00'::timestamp without time zone)",
            "('2020-01-01 00:00:00+00'::timestamp with time zone)",
            "((x)::numeric(10,2) > 1.5e-3)",
            "EXTRACT(year FROM created_at)",
            "(\"Mixed Case\" <> 'x'::text)",
            "(tags && '{a,b}'::text[])",
            "pg_catalog.lower(name)",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "pg_sleep(10)",
            "pg_read_file('/etc/passwd'::text)",
            "dblink('host=x'::text, 'select 1'::text)",
            "lower(x) || pg_catalog.pg_terminate_backend(1)",
            "set_config('a'::text, 'b'::text, false)",
            "evil.lower(x)",
            "\"pg_sleep\"(1)",
            "1; DROP TABLE t",
            "'x'::text); DROP TABLE t; --",
            "1 -- comment",
            "1 /* comment */",
            "E'\\'' || pg_sleep(1) || '",
            "$$x$$",
            "(SELECT 1)",
            "EXISTS (SELECT 1)",
            "1) , (2",
            "(1",
            "1)",
            "x[1",
            "OPERATOR(pg_catalog.+)(1, 2)",
            "'unterminated",
            "",
            "U&'\\0041'",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        assert!(check(&"1 + ".repeat(10_000)).is_err());
        assert!(check("a\0b").is_err());
    }

    #[test]
    fn operators_are_checked() {
        assert!(check_operator("&&").is_ok());
        assert!(check_operator("=").is_ok());
        assert!(check_operator("= ; DROP").is_err());
        assert!(check_operator("--").is_err());
        assert!(check_operator("").is_err());
    }
}
