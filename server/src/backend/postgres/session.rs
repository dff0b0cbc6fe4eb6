//! Which statements leave a pooled session as they found it.
//!
//! A pooled PostgreSQL session is reset before its next caller (settings,
//! role, LISTEN, advisory locks, temporary tables). The reset costs the
//! engine more than a point lookup, so it is skipped after statements that
//! cannot have changed the session: one read-only query (SELECT, WITH,
//! VALUES, TABLE, SHOW) whose function calls are all built-ins known to
//! leave the session alone. Anything else, including every call to a
//! function not on the list (`set_config`, `pg_advisory_lock`, user
//! functions), is followed by the reset. The lexer errs toward "changed":
//! what it cannot read is reset.
//!
//! What no text can show: a view, rule or row-level-security policy that
//! calls a session-changing function, or a user function taking a table's
//! row called in attribute notation (`t.f` for `f(t)`), which reads as a
//! column. `session_reset = "always"` on the
//! source resets after every statement for databases that have such objects.

/// Read-only statement kinds.
#[rustfmt::skip]
const READ_ONLY_STARTS: &[&str] = &["select", "with", "values", "table", "show"];

/// Words that make a read-only-looking statement write or create something
/// (`SELECT ... INTO` makes a table, a temporary one with `INTO TEMP`;
/// data-modifying CTEs can fire triggers, which are user code), or lock
/// rows (`FOR UPDATE`, `FOR SHARE`, `FOR KEY SHARE`: on a shared connection
/// a wait for a writer's lock would hold every statement behind it).
#[rustfmt::skip]
const WRITES: &[&str] = &["into", "insert", "update", "delete", "merge", "copy", "call", "do", "share"];

/// Keywords that may stand before `(` without calling a function: reserved
/// words and those no function may be named (PostgreSQL's col_name
/// keywords). Unreserved ones (`rows`, `range`, `over`, `filter`, `cube`,
/// ...) can name a user's function, so `SELECT rows(1)` is a call; `over`
/// and `filter` are keywords only right after a call's `)`, `by` only
/// after `group`, `order` or `partition`, and the words that may name a
/// function or a type (`like`, `ilike`, `similar`, `is`, `join`) only
/// after an operand (see `keyword_here`).
#[rustfmt::skip]
const KEYWORDS: &[&str] = &[
    "all", "and", "any", "array", "as", "between", "case", "cast", "coalesce", "distinct", "else",
    "except", "exists", "extract", "from", "greatest", "grouping", "having", "in",
    "intersect", "lateral", "least", "not", "nullif", "on", "or", "overlay",
    "position", "row", "select", "some", "substring",
    "then", "treat", "trim", "union", "using", "values", "when", "where", "with",
    // Type names with a modifier, as in `::numeric(10, 2)`.
    "bit", "char", "character", "decimal", "float", "interval", "numeric", "time", "timestamp", "varchar",
];

/// Whether `word` before `(` is a keyword where it stands, `before` being
/// the token before it (`)` or a word).
fn keyword_here(word: &str, before: &Before) -> bool {
    match (word, before) {
        ("over" | "filter", Before::Close) => true,
        ("by", Before::Ordering) => true,
        // `a LIKE (...)`, `t JOIN (...)`: after an operand; `SELECT like(1)`
        // or `FROM join(1)` call a function of that name.
        // (After a `)`, as in `DISTINCT ON (a) like(a)`, it may be a call.)
        ("like" | "ilike" | "similar" | "is" | "join", Before::Operand) => true,
        _ => KEYWORDS.contains(&word),
    }
}

/// The token before a word, as far as `keyword_here` needs it.
#[derive(Clone, Copy)]
enum Before {
    Close,
    /// `group`, `order` or `partition`.
    Ordering,
    /// A word that is no keyword: a name, as a column or table is.
    Operand,
    Other,
}

impl Before {
    fn word(w: &str) -> Before {
        match w {
            "group" | "order" | "partition" => Before::Ordering,
            // Words that start a clause: what follows is an operand's place.
            "by" | "limit" | "offset" | "fetch" | "returning" | "window" => Before::Other,
            _ if KEYWORDS.contains(&w) || WRITES.contains(&w) => Before::Other,
            _ => Before::Operand,
        }
    }
}

/// Built-in functions that read their arguments and the database, and
/// change nothing in the session.
#[rustfmt::skip]
const PURE_FUNCTIONS: &[&str] = &[
    "abs", "age", "array_agg", "array_length", "array_position", "array_to_string", "avg", "bit_and", "bit_or",
    "bool_and", "bool_or", "btrim", "cardinality", "ceil", "ceiling", "char_length", "concat", "concat_ws", "count",
    "cume_dist", "current_setting", "date_part", "date_trunc", "decode", "dense_rank", "encode", "every", "exp",
    "first_value", "floor", "format", "gen_random_uuid", "generate_series", "initcap", "json_agg", "json_array_length",
    "json_build_array", "json_build_object", "json_object_agg", "jsonb_agg", "jsonb_array_elements",
    "jsonb_array_length", "jsonb_build_array", "jsonb_build_object", "jsonb_each", "jsonb_extract_path",
    "jsonb_extract_path_text", "jsonb_object_agg", "jsonb_set", "jsonb_typeof", "lag", "last_value", "lead", "left",
    "length", "ln", "log", "lower", "lpad", "ltrim", "make_date", "make_interval", "make_timestamp", "max", "md5",
    "min", "mod", "mode", "now", "nth_value", "ntile", "octet_length", "percent_rank", "percentile_cont",
    "percentile_disc", "pg_backend_pid", "power", "rank", "regexp_replace", "regexp_match", "repeat", "replace", "reverse", "right",
    "round", "row_number", "row_to_json", "rpad", "rtrim", "sign", "split_part", "sqrt", "starts_with", "stddev",
    "string_agg", "strpos", "substr", "sum", "to_char", "to_date", "to_json", "to_jsonb", "to_number",
    "to_timestamp", "trunc", "unnest", "upper", "variance",
];

/// True when `sql` is a `COPY` to or from the client (`FROM STDIN`, `TO
/// STDOUT`), read past comments and quotes: it leaves the query protocol
/// for a data exchange a statement call cannot carry (in COPY IN the server
/// ignores the Sync that ends the call and waits for data).
pub fn copies_with_client(sql: &str) -> bool {
    let mut lexer = Lexer {
        s: sql.as_bytes(),
        i: 0,
        escape_string: false,
    };
    if lexer.next() != Some(Token::Word("copy".into())) {
        return false;
    }
    let mut previous = None;
    while let Some(token) = lexer.next() {
        match (&previous, &token) {
            (Some(Token::Word(a)), Token::Word(b)) if (a == "from" && b == "stdin") || (a == "to" && b == "stdout") => {
                return true
            }
            (_, Token::End | Token::Semicolon) => return false,
            _ => previous = Some(token),
        }
    }
    false
}

/// True when `sql` is one read-only statement that calls no function able
/// to change the session, so the session needs no reset after it.
pub fn leaves_session_unchanged(sql: &str) -> bool {
    let mut lexer = Lexer {
        s: sql.as_bytes(),
        i: 0,
        escape_string: false,
    };
    let mut first = true;
    // The word just read, whether it was qualified by a schema other than
    // pg_catalog, and the token before it.
    let mut previous: Option<(String, bool, Before)> = None;
    let mut before = Before::Other;
    // The token just read was a quoted name (a name, as a word is).
    let mut quoted_name = false;
    loop {
        let Some(token) = lexer.next() else {
            return false;
        };
        let after_quoted_name = std::mem::replace(&mut quoted_name, matches!(token, Token::QuotedName));
        match token {
            Token::End => return !first,
            Token::Word(w) => {
                if first && !READ_ONLY_STARTS.contains(&w.as_str()) {
                    return false;
                }
                first = false;
                if WRITES.contains(&w.as_str()) {
                    return false;
                }
                let next = Before::word(&w);
                previous = Some((w, false, std::mem::replace(&mut before, next)));
                continue;
            }
            Token::Dot => {
                // Only a name (schema, table, alias) may stand before a dot:
                // after a value (`(4242::bigint).pg_advisory_lock`, `$1.f`,
                // `(SELECT 1).f`) the word after it calls a function of that
                // name on the value (attribute notation), without a `(`.
                if previous.is_none() && !after_quoted_name {
                    return false;
                }
                // `schema.function(`: only pg_catalog's own functions are known.
                if let Some(Token::Word(w)) = lexer.peek() {
                    lexer.next();
                    let foreign = previous.take().is_none_or(|(schema, ..)| schema != "pg_catalog");
                    before = Before::word(&w);
                    previous = Some((w, foreign, Before::Other));
                    continue;
                }
            }
            Token::Open => {
                if let Some((name, foreign, ahead)) = &previous {
                    let known = PURE_FUNCTIONS.contains(&name.as_str()) || keyword_here(name, ahead);
                    if *foreign || !known {
                        return false;
                    }
                }
            }
            // A quoted name before `(` calls a function by its exact name: unknown.
            Token::QuotedName => {
                if matches!(lexer.peek(), Some(Token::Open)) {
                    return false;
                }
            }
            Token::Semicolon => return lexer.next() == Some(Token::End) && !first,
            Token::Close | Token::Other => {}
        }
        first = false;
        before = match token {
            Token::Close => Before::Close,
            _ => Before::Other,
        };
        previous = None;
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    QuotedName,
    Open,
    Close,
    Dot,
    Semicolon,
    Other,
    End,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
    /// The next quote opens an E'...' string, where a backslash escapes.
    escape_string: bool,
}

impl Lexer<'_> {
    fn peek(&mut self) -> Option<Token> {
        let (at, escape_string) = (self.i, self.escape_string);
        let token = self.next();
        (self.i, self.escape_string) = (at, escape_string);
        token
    }

    /// The next token; None for text the lexer cannot read (an unclosed
    /// quote or comment), which the caller takes as "changed".
    fn next(&mut self) -> Option<Token> {
        self.skip_space()?;
        let Some(&c) = self.s.get(self.i) else {
            return Some(Token::End);
        };
        self.i += 1;
        Some(match c {
            b'(' => Token::Open,
            b')' => Token::Close,
            b'.' if !self.s.get(self.i).is_some_and(u8::is_ascii_digit) => Token::Dot,
            b';' => Token::Semicolon,
            b'\'' => {
                // Only the prefix word `E` itself: `ELSE'\'` is a plain string.
                let escapes = std::mem::take(&mut self.escape_string);
                self.quoted(b'\'', escapes)?;
                // Strings separated by space holding a line break are one
                // string to PostgreSQL, of the first one's kind: an E'...'
                // string goes on escaping in the next part.
                while self.continues()? {
                    self.quoted(b'\'', escapes)?;
                }
                Token::Other
            }
            b'"' => {
                self.quoted(b'"', false)?;
                Token::QuotedName
            }
            b'$' => {
                self.dollar()?;
                Token::Other
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = self.i - 1;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80)
                {
                    self.i += 1;
                }
                let word = String::from_utf8_lossy(&self.s[start..self.i]).to_ascii_lowercase();
                // E'...' and U&'...' strings start with a letter.
                if self.s.get(self.i) == Some(&b'\'') && matches!(word.as_str(), "e" | "b" | "x" | "n") {
                    self.escape_string = word == "e";
                    return Some(Token::Other);
                }
                Token::Word(word)
            }
            _ => Token::Other,
        })
    }

    /// Skips spaces and comments; None inside an unclosed block comment.
    fn skip_space(&mut self) -> Option<()> {
        loop {
            match (self.s.get(self.i), self.s.get(self.i + 1)) {
                // PostgreSQL 16 counts a vertical tab as a space too.
                (Some(c), _) if c.is_ascii_whitespace() || *c == 0x0b => self.i += 1,
                (Some(b'-'), Some(b'-')) => {
                    // PostgreSQL ends the comment at either line break.
                    while self.s.get(self.i).is_some_and(|&c| c != b'\n' && c != b'\r') {
                        self.i += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    // Block comments nest in PostgreSQL.
                    let mut depth = 0usize;
                    loop {
                        match (self.s.get(self.i), self.s.get(self.i + 1)) {
                            (None, _) => return None,
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.i += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.i += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => self.i += 1,
                        }
                    }
                }
                _ => return Some(()),
            }
        }
    }

    /// After a closed string: whether a continuation of it follows (space
    /// or comments holding a line break, then a quote), which is then
    /// opened. None inside an unclosed comment.
    fn continues(&mut self) -> Option<bool> {
        let at = self.i;
        self.skip_space()?;
        let line_break = self.s[at..self.i].iter().any(|&c| c == b'\n' || c == b'\r');
        if line_break && self.s.get(self.i) == Some(&b'\'') {
            self.i += 1;
            return Some(true);
        }
        self.i = at;
        Some(false)
    }

    /// Skips to the end of a quoted string or name ('' or "" inside it is
    /// the quote itself; with `escapes`, a backslash escapes the next byte).
    fn quoted(&mut self, quote: u8, escapes: bool) -> Option<()> {
        loop {
            let c = *self.s.get(self.i)?;
            self.i += 1;
            if escapes && c == b'\\' {
                self.i += 1;
            } else if c == quote {
                if self.s.get(self.i) == Some(&quote) {
                    self.i += 1;
                } else {
                    return Some(());
                }
            }
        }
    }

    /// A parameter ($1) or a dollar-quoted string ($$...$$, $tag$...$tag$).
    fn dollar(&mut self) -> Option<()> {
        if self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            return Some(());
        }
        let start = self.i - 1;
        while self
            .s
            .get(self.i)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.i += 1;
        }
        if self.s.get(self.i) != Some(&b'$') {
            return None;
        }
        self.i += 1;
        let tag = &self.s[start..self.i];
        let body = &self.s[self.i..];
        let end = body.windows(tag.len()).position(|w| w == tag)?;
        self.i += end + tag.len();
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::leaves_session_unchanged as neutral;

    #[test]
    fn copies_with_the_client_are_told_from_other_copies() {
        use super::copies_with_client as with_client;
        for sql in [
            "copy t from stdin",
            "COPY t FROM /* c */ STDIN",
            "COPY (SELECT 1) TO STDOUT WITH (FORMAT csv)",
            "COPY t FROM STDIN(FORMAT csv)",
        ] {
            assert!(with_client(sql), "{sql}");
        }
        for sql in [
            "COPY t TO '/tmp/stdout.csv'",
            "COPY t (stdin) FROM '/tmp/t.csv'",
            "COPY (SELECT 'x from stdin') TO '/tmp/f'",
            "SELECT 'copy from stdin'",
        ] {
            assert!(!with_client(sql), "{sql}");
        }
    }

    #[test]
    fn plain_reads_leave_the_session_alone() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select count(*), max(x) from t where y in (1, 2) and exists (select 1 from u)",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "SELECT lower(name) || 'set_config(' FROM t -- pg_advisory_lock(1)\n",
            "SELECT 1::numeric(10, 2), pg_catalog.upper('a'), $$ LISTEN x $$, E'it\\'s'",
            "SELECT 'con'\n'tinued', E'a'\n'\\'b' AS x",
            "SELECT 1;",
            "VALUES (1), (2)",
            "TABLE customers",
            "SHOW search_path",
            "SELECT /* nested /* comment */ set_config( */ 1",
            "SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t",
            "SELECT count(*) FILTER (WHERE x > 1) FROM t GROUP BY (a, b) ORDER BY (a)",
            "SELECT \"Name\" FROM \"Mixed\".\"Table\"",
            "SELECT \"t\".id, u.name, s.t.x, t.* FROM \"t\", u",
            "SELECT 1.5 + .5",
            // Operators, after an operand.
            "SELECT name LIKE ('a%'), name ILIKE ('b%') FROM t",
            "SELECT * FROM t JOIN (SELECT 1 AS y) u ON true LEFT JOIN (SELECT 2 AS z) v ON true",
        ] {
            assert!(neutral(sql), "{sql}");
        }
    }

    #[test]
    fn anything_that_may_change_the_session_is_reset() {
        for sql in [
            "SELECT set_config('application_name', 'x', false)",
            "SELECT pg_advisory_lock(4242)",
            "select PG_ADVISORY_LOCK(1)",
            "SELECT my_function()",
            "SELECT public.lower('a')",
            "SELECT \"lower\"('a')",
            "SELECT * INTO TEMP t FROM u",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT nextval('s')",
            // A function called on a value in attribute notation.
            "SELECT (4242::bigint).pg_advisory_lock",
            "SELECT $1.pg_advisory_lock",
            "SELECT (SELECT 0.5).setseed",
            "SELECT ('s'::regclass).\"nextval\"",
            "SELECT ids[1].f FROM t",
            // Unreserved keywords name user functions as well.
            "SELECT rows(1)",
            "SELECT range(1), within(2)",
            "SELECT x FROM t WHERE over(1) AND filter(2)",
            "SELECT a, cube(1) FROM t",
            "SELECT 1 FROM t ORDER BY by(1)",
            // So do words that may name a function or a type, where no
            // operand stands before them.
            "SELECT similar(1)",
            "SELECT like('a')",
            "SELECT * FROM join(1)",
            "SELECT x, is(2) FROM t",
            "SELECT a FROM t ORDER BY like(a)",
            "SELECT a FROM t LIMIT is(1)",
            "SELECT DISTINCT ON (a) like(a) FROM t",
            // Row locks wait on writers: not for a shared connection.
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM t FOR KEY SHARE",
            "SET application_name = 'x'",
            "BEGIN",
            "LISTEN ch",
            "CREATE TEMP TABLE t (x int)",
            "INSERT INTO t VALUES (1)",
            "SELECT 1; SET role = x",
            "SELECT 'unclosed",
            "SELECT /* unclosed",
            "SELECT $tag$ unclosed",
            // A word ending in E before a quote does not make an E'' string:
            // the backslash here escapes nothing, and set_config is code.
            "SELECT CASE WHEN true THEN 'a' ELSE'\\' END, set_config('default_transaction_read_only', 'off', false) --'",
            "SELECT 'a' LIKE'\\', set_config('role', 'x', false) --'",
            // The second part of an E'' string continued on the next line
            // escapes too: its quote is text, and set_config is code.
            "SELECT E'a'\n'\\' x', set_config($$default_transaction_read_only$$, $$off$$, false) --'",
            "SELECT E'a' -- note\n '\\' x', pg_advisory_lock(1) --'",
            // A carriage return ends a comment for PostgreSQL.
            "SELECT 1 --\r, set_config('default_transaction_read_only', 'off', false)",
            "WITH --\r x AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT 1",
            "",
            "   ",
            ";",
        ] {
            assert!(!neutral(sql), "{sql}");
        }
    }
}
