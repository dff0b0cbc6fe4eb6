//! What a statement's text tells before any engine parses it: its leading
//! words, after spaces and comments. Only for decisions where reading a
//! word wrong refuses or resets too much, never too little.

/// How an engine may read comments. Engines differ, and a word one reading
/// takes for a comment another runs as code, so callers look at every
/// reading: PostgreSQL nests block comments and ends `--` at `\r` too;
/// MySQL and SQLite do neither; MySQL and MariaDB run `/*! ... */` and
/// `/*M! ... */` as code (depending on a version number we cannot know).
#[derive(Clone, Copy)]
struct Reading {
    nested: bool,
    versioned_code: bool,
    cr_ends_line: bool,
}

const READINGS: [Reading; 8] = {
    let mut all = [Reading {
        nested: false,
        versioned_code: false,
        cr_ends_line: false,
    }; 8];
    let mut i = 0;
    while i < 8 {
        all[i] = Reading {
            nested: i & 1 != 0,
            versioned_code: i & 2 != 0,
            cr_ends_line: i & 4 != 0,
        };
        i += 1;
    }
    all
};

/// The first `n` words of `sql` under every way an engine may read its
/// comments, lowercased, after spaces and `--`, `#` and `/* */` comments;
/// fewer when a non-word character (`;`, `(`) or the end comes first. `@`
/// may start a word (a T-SQL variable). Readings that agree are given once.
pub fn leading_words(sql: &str, n: usize) -> Vec<Vec<String>> {
    // Without a comment, every reading is the same: one pass, not eight
    // (SQLite asks for every statement).
    if !sql.contains(['-', '/', '#']) {
        return vec![words_as(sql, n, READINGS[0])];
    }
    let mut readings: Vec<Vec<String>> = Vec::with_capacity(2);
    for reading in READINGS {
        let words = words_as(sql, n, reading);
        if !readings.contains(&words) {
            readings.push(words);
        }
    }
    readings
}

fn words_as(sql: &str, n: usize, reading: Reading) -> Vec<String> {
    let mut words = Vec::with_capacity(n);
    let mut rest = sql;
    while words.len() < n {
        rest = skip_space(rest, reading);
        // Empty statements before the first word (T-SQL's `;WITH ...`), and
        // parentheses: PostgreSQL reads `(WITH d AS (DELETE ...) SELECT ...)`
        // as the statement inside them.
        while let (true, Some(after)) = (words.is_empty(), rest.strip_prefix([';', '('])) {
            rest = skip_space(after, reading);
        }
        let end = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_alphanumeric() || c == '_' || (i == 0 && c == '@')))
            .map_or(rest.len(), |(i, _)| i);
        if end == 0 {
            break;
        }
        words.push(rest[..end].to_lowercase());
        rest = &rest[end..];
    }
    words
}

fn skip_space(mut rest: &str, reading: Reading) -> &str {
    loop {
        rest = rest.trim_start();
        let versioned = rest.strip_prefix("/*!").or_else(|| rest.strip_prefix("/*M!"));
        if let (Some(code), true) = (versioned, reading.versioned_code) {
            // MySQL runs what is inside, after an optional version number.
            rest = code.trim_start_matches(|c: char| c.is_ascii_digit());
        } else if let Some(comment) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            let line_end = |c: char| c == '\n' || (reading.cr_ends_line && c == '\r');
            rest = comment.find(line_end).map_or("", |i| &comment[i + 1..]);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = block_comment_end(comment, reading.nested);
        } else {
            return rest;
        }
    }
}

/// What follows the block comment whose opening `/*` came just before
/// `rest`; empty when it is not closed. One pass over the bytes: searching
/// the rest again at each nested `/*` took time growing with the square of
/// a statement full of them.
fn block_comment_end(rest: &str, nested: bool) -> &str {
    let bytes = rest.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    // After an ASCII `*/`: a character boundary.
                    return rest.get(i..).unwrap_or_default();
                }
            }
            (b'/', b'*') if nested => {
                depth += 1;
                i += 2;
            }
            _ => i += 1,
        }
    }
    ""
}

/// Whether `sql` runs procedural code that may commit by itself: a
/// top-level `DO` block or `CALL` of a procedure (PostgreSQL runs both
/// non-atomically outside a transaction block).
pub fn may_commit_inside(sql: &str) -> bool {
    leading_words(sql, 1)
        .iter()
        .any(|words| matches!(words.first().map(String::as_str), Some("do" | "call")))
}

/// Whether MySQL/MariaDB `sql` could leave the read-only access mode a
/// read-only source's sessions are in: a `READ WRITE` mode, the
/// `tx_read_only`/`transaction_read_only` variables (also for one statement,
/// `SET STATEMENT ... FOR`), or code Weir cannot read that could do either
/// (a procedure, dynamic SQL). Every word counts, in comments and strings
/// too, since MySQL runs versioned comments as code.
pub fn may_leave_read_only(sql: &str) -> bool {
    words_anywhere(sql).any(|w| {
        [
            "write",
            "call",
            "execute",
            "prepare",
            "tx_read_only",
            "transaction_read_only",
        ]
        .iter()
        .any(|k| w.eq_ignore_ascii_case(k))
    })
}

/// Whether MySQL/MariaDB `sql` is a `SET` of the session's time zone or
/// character sets (`SET time_zone = ...`, `SET NAMES`, `SET CHARACTER SET`,
/// `character_set_*`, `collation_connection`, also in `SET STATEMENT ...
/// FOR`): Weir reads and binds TIMESTAMPs as UTC and text as utf8mb4, and a
/// transaction's session would keep the change for its later statements.
pub fn sets_mysql_time_zone_or_charset(sql: &str) -> bool {
    sets_one_of(
        sql,
        &[
            "time_zone",
            "names",
            "character",
            "charset",
            "character_set_client",
            "character_set_connection",
            "character_set_results",
            "collation_connection",
        ],
    )
}

/// Whether PostgreSQL `sql` sets the session's `client_encoding` (`SET
/// client_encoding`, `SET NAMES`, `set_config('client_encoding', ...)`, an
/// `UPDATE` of `pg_settings` or a `DO` block that sets it): Weir sends and
/// reads text as UTF-8, and a transaction's session would keep the change
/// for its later statements. A function of the caller's that sets it, or a
/// name passed to `set_config` as a parameter, is not seen.
pub fn sets_postgres_client_encoding(sql: &str) -> bool {
    if sets_one_of(sql, &["client_encoding", "names"]) {
        return true;
    }
    // A plain search first: every statement is asked.
    const NAME: &[u8] = b"client_encoding";
    if !sql.as_bytes().windows(NAME.len()).any(|w| w.eq_ignore_ascii_case(NAME)) {
        return false;
    }
    set_config_of(sql, "client_encoding")
        || (has_word(sql, &["pg_settings"]) && has_word(sql, &["update"]))
        || (may_commit_inside(sql) && has_word(sql, &["set", "set_config"]))
}

/// Whether `sql` calls `set_config` with `name` in its first argument,
/// however quoted (`'name'`, `E'name'`, `$$name$$`, after a comment): the
/// text up to the first `,` or `)` after the `(`.
fn set_config_of(sql: &str, name: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.match_indices("set_config").any(|(at, call)| {
        lower[at + call.len()..]
            .trim_start()
            .strip_prefix('(')
            .and_then(|args| args.split([',', ')']).next())
            .is_some_and(|first| first.contains(name))
    })
}

/// Whether the first word of `sql` is `word` (lowercase), read past
/// comments and opening parentheses under every engine's reading. Told from
/// the first bytes where neither comes first: every pooled statement is asked, and
/// `leading_words` allocates.
pub fn starts_with_word(sql: &str, word: &str) -> bool {
    let head = sql.trim_start().as_bytes();
    match head.first() {
        Some(b'-' | b'/' | b'#' | b'(') => leading_words(sql, 1)
            .iter()
            .any(|words| words.first().map(String::as_str) == Some(word)),
        _ => {
            head.len() >= word.len()
                && head[..word.len()].eq_ignore_ascii_case(word.as_bytes())
                && head
                    .get(word.len())
                    .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        }
    }
}

/// Whether `sql` is a `SET` of one of `names` (lowercase). Only what is set
/// counts: the words before each top-level `=` or `TO`, outside strings and
/// parentheses (`SET @tz = (SELECT time_zone ...)` sets none).
fn sets_one_of(sql: &str, names: &[&str]) -> bool {
    if !starts_with_word(sql, "set") {
        return false;
    }
    let bytes = sql.as_bytes();
    let (mut depth, mut quote, mut target) = (0usize, None, true);
    let mut word_start = None;
    let mut i = 0;
    while i <= bytes.len() {
        let c = bytes.get(i).copied().unwrap_or(b' ');
        let in_word = quote.is_none() && (c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80);
        if in_word {
            word_start.get_or_insert(i);
            i += 1;
            continue;
        }
        if let Some(s) = word_start.take() {
            // A user variable's name (`@names`, not `@@names`) is no setting.
            let user_variable = s >= 1 && bytes[s - 1] == b'@' && !(s >= 2 && bytes[s - 2] == b'@');
            let word = sql[s..i].trim_start_matches(|c: char| c.is_ascii_digit());
            if target && depth == 0 && !user_variable && names.iter().any(|k| word.eq_ignore_ascii_case(k)) {
                return true;
            }
            // PostgreSQL's `SET name TO value`.
            if depth == 0 && word.eq_ignore_ascii_case("to") {
                target = false;
            }
        }
        match (quote, c) {
            (Some((q, from)), _) if c == q => {
                quote = None;
                // A quoted name (`SET "client_encoding"`, MySQL's backticks).
                let name = &sql[from..i];
                if q != b'\'' && target && depth == 0 && names.iter().any(|k| name.eq_ignore_ascii_case(k)) {
                    return true;
                }
            }
            (Some(_), b'\\') => i += 1,
            (Some(_), _) => {}
            (None, b'\'' | b'"' | b'`') => quote = Some((c, i + 1)),
            // Comments hide nothing (an `=` or a quote in one ends nothing),
            // but MySQL runs what its `/*!` and `/*M!` comments hold.
            (None, b'-') if bytes.get(i + 1) == Some(&b'-') => i = line_end(bytes, i),
            (None, b'#') => i = line_end(bytes, i),
            (None, b'/')
                if bytes.get(i + 1) == Some(&b'*')
                    && !matches!(bytes.get(i + 2), Some(b'!'))
                    && !(bytes.get(i + 2) == Some(&b'M') && bytes.get(i + 3) == Some(&b'!')) =>
            {
                i = sql[i + 2..].find("*/").map_or(bytes.len(), |end| i + 2 + end + 1);
            }
            (None, b'(') => depth += 1,
            (None, b')') => depth = depth.saturating_sub(1),
            (None, b'=') if depth == 0 => target = false,
            (None, b',') if depth == 0 => target = true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// The index of the line break ending the line `i` is on (or the end).
fn line_end(bytes: &[u8], i: usize) -> usize {
    bytes[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |n| i + n)
}

/// Whether any word of `sql` (comments and strings included, so a match
/// may be a false one) is one of `words`, which are lowercase.
pub fn has_word(sql: &str, words: &[&str]) -> bool {
    words_anywhere(sql).any(|w| words.iter().any(|k| w.eq_ignore_ascii_case(k)))
}

/// Every word of `sql`, comments and strings included. A version number
/// glued to a word (`/*!50000WRITE*/`, which MySQL runs as `WRITE`) is
/// taken off it.
fn words_anywhere(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map(|w| w.trim_start_matches(|c: char| c.is_ascii_digit()))
}

/// Whether T-SQL `sql` may leave state on its session that outlives the
/// `sp_executesql` it runs in (which undoes `SET` options and drops `#temp`
/// tables): a session-owned application lock, session context or
/// `CONTEXT_INFO`, an application role, a cursor, an opened key, a
/// `##global` temporary table. Any word counts, comments and strings too;
/// what a procedure or dynamic SQL does inside is not seen.
pub fn may_keep_mssql_session_state(sql: &str) -> bool {
    sql.contains("##")
        || words_anywhere(sql).any(|w| {
            [
                "sp_getapplock",
                "sp_set_session_context",
                "context_info",
                "sp_setapprole",
                // A cursor (GLOBAL by default on many servers), and a key
                // opened with OPEN ... KEY ... DECRYPTION BY.
                "cursor",
                "decryption",
            ]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
        })
}

/// Whether `sql` starts, commits or rolls back a transaction (not a
/// savepoint's), which inside a transaction handle would end the
/// transaction behind the handle's back.
pub fn controls_transaction(sql: &str) -> bool {
    leading_words(sql, 3).iter().any(|words| controls(words))
}

fn controls(words: &[String]) -> bool {
    let word = |i: usize| words.get(i).map_or("", String::as_str);
    match word(0) {
        "commit" | "abort" | "xa" => true,
        "end" => matches!(word(1), "" | "work" | "transaction"),
        "start" | "prepare" => word(1) == "transaction",
        // BEGIN [WORK | TRANSACTION | TRAN | modes]; not BEGIN TRY, a T-SQL
        // block or MariaDB's BEGIN NOT ATOMIC.
        "begin" => match word(1) {
            "not" => word(2) == "deferrable",
            w => matches!(
                w,
                "" | "work"
                    | "transaction"
                    | "tran"
                    | "isolation"
                    | "read"
                    | "deferrable"
                    | "deferred"
                    | "immediate"
                    | "exclusive"
                    | "distributed"
            ),
        },
        // ROLLBACK [WORK] TO [SAVEPOINT] s, and SQL Server's ROLLBACK TRAN s,
        // undo a savepoint; AND [NO] CHAIN and [NO] RELEASE end the transaction.
        "rollback" => match word(1) {
            "to" => false,
            "work" | "transaction" | "tran" => matches!(word(2), "" | "and" | "no" | "release"),
            _ => true,
        },
        _ => false,
    }
}

/// Whether `sql` may write rows and hand them back in one statement
/// (`RETURNING`, T-SQL's `OUTPUT`, or PostgreSQL's writing CTE under a
/// SELECT). Run alone, such a statement commits before its caller has seen
/// its rows; a unary call that refuses them for the response caps must not
/// leave them written. A word in a string or a comment only costs a
/// transaction that was not needed.
pub fn writes_and_returns_rows(sql: &str) -> bool {
    // The commonest statement, a plain SELECT, in a few instructions: it
    // cannot write, whatever its text holds (a lookup scanned every word).
    let head = sql.trim_start().as_bytes();
    if head.len() >= 6
        && head[..6].eq_ignore_ascii_case(b"select")
        && head
            .get(6)
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b >= 0x80))
    {
        return false;
    }
    let returns = words_anywhere(sql).any(|w| w.eq_ignore_ascii_case("returning") || w.eq_ignore_ascii_case("output"));
    // Without RETURNING, only a CTE that writes hands back rows (the outer
    // SELECT's): a WITH, read without building its words unless a comment
    // or parentheses come first, as for every other statement.
    if !returns {
        return starts_with_word(sql, "with") && has_word(sql, &["insert", "update", "delete", "merge"]);
    }
    leading_words(sql, 1)
        .iter()
        .any(|w| match w.first().map(String::as_str) {
            Some("insert" | "update" | "delete" | "merge" | "replace") => true,
            // A WITH writes only through a writing statement in it: a read
            // that names a column `output` must not take SQLite's write lock.
            // REPLACE is a statement only as MySQL's or SQLite's last one
            // (elsewhere it is a string function).
            Some("with") => has_word(sql, &["insert", "update", "delete", "merge", "replace"]),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_words_are_read_past_comments_and_whole() {
        for sql in [
            "USE shop",
            "  use`shop`",
            "/* c */ use shop",
            "-- c\nUSE shop",
            "# c\nuse shop",
            "use",
        ] {
            assert!(starts_with_word(sql, "use"), "{sql}");
        }
        for sql in ["used", "user_id = 1", "SELECT 1 -- use", "/* use */ SELECT 1", "us"] {
            assert!(!starts_with_word(sql, "use"), "{sql}");
        }
    }

    #[test]
    fn a_with_that_only_reads_does_not_write_and_return_rows() {
        assert!(!writes_and_returns_rows(
            "WITH r AS (SELECT * FROM jobs) SELECT output FROM r"
        ));
        assert!(!writes_and_returns_rows(
            "with returning as (select 1) select * from returning"
        ));
        assert!(writes_and_returns_rows(
            "WITH u AS (UPDATE jobs SET done = true RETURNING id) SELECT * FROM u"
        ));
        assert!(writes_and_returns_rows(
            "WITH c AS (SELECT 1 AS id) REPLACE INTO t SELECT * FROM c RETURNING *"
        ));
        assert!(!writes_and_returns_rows(
            "WITH r AS (SELECT replace(a, 'x', 'y') AS a FROM t) SELECT a FROM r"
        ));
        assert!(writes_and_returns_rows(
            "WITH d AS (DELETE FROM jobs WHERE done) SELECT * FROM report"
        ));
        assert!(writes_and_returns_rows(
            "/* tag */ (WITH d AS (DELETE FROM jobs RETURNING id) SELECT * FROM d)"
        ));
    }

    #[test]
    fn procedures_that_may_commit_are_told_apart() {
        assert!(writes_and_returns_rows(
            "((WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d))"
        ));
        assert!(may_commit_inside("DO $$ BEGIN COMMIT; END $$"));
        assert!(may_commit_inside(" call p()"));
        assert!(!may_commit_inside("SELECT do_it()"));
    }

    #[test]
    fn postgres_client_encoding_settings_are_told_apart() {
        for sql in [
            "SET client_encoding = 'LATIN1'",
            "set session CLIENT_ENCODING to 'SQL_ASCII'",
            "SET NAMES 'LATIN1'",
            "SET LOCAL client_encoding TO latin1",
            "SET \"client_encoding\" = 'LATIN1'",
            "SET /* = */ client_encoding = 'LATIN1'",
            "SELECT set_config('client_encoding', 'LATIN1', false)",
            "SELECT set_config($$client_encoding$$, 'LATIN1', false)",
            "SELECT set_config(E'client_encoding', 'LATIN1', false)",
            "SELECT set_config( /* x */ 'CLIENT_ENCODING', 'LATIN1', false)",
            "select SET_CONFIG ( 'CLIENT_ENCODING', 'LATIN1', true)",
            "UPDATE pg_settings SET setting = 'LATIN1' WHERE name = 'client_encoding'",
            "DO $$BEGIN SET client_encoding = 'LATIN1'; END$$",
        ] {
            assert!(sets_postgres_client_encoding(sql), "{sql}");
        }
        for sql in [
            "SET search_path TO names, public",
            "SELECT set_config('application_name', 'names', false)",
            "SET application_name = 'client_encoding'",
            "SHOW client_encoding",
            "SELECT current_setting('client_encoding')",
            "SELECT name, setting FROM pg_settings WHERE name IN ('client_encoding', 'server_encoding')",
            "SELECT set_config('app.enc', current_setting('client_encoding'), false)",
            "DO $$BEGIN RAISE NOTICE '%', current_setting('client_encoding'); END$$",
        ] {
            assert!(!sets_postgres_client_encoding(sql), "{sql}");
        }
    }

    #[test]
    fn mysql_time_zone_and_charset_settings_are_told_apart() {
        for sql in [
            "SET time_zone = '+05:00'",
            "set @@session.TIME_ZONE = 'Europe/Paris'",
            "SET NAMES latin1",
            "SET CHARACTER SET latin1",
            "SET character_set_results = NULL",
            "SET STATEMENT time_zone = '+01:00' FOR SELECT ts FROM t",
            "/*!40101 SET NAMES utf8 */",
            "SET @a = 1, collation_connection = latin1_swedish_ci",
            "SET -- it's\n time_zone = '+05:00'",
            "SET # =\n `time_zone` = '+05:00'",
        ] {
            assert!(sets_mysql_time_zone_or_charset(sql), "{sql}");
        }
        for sql in [
            "SELECT names, time_zone FROM t",
            "SET @names = 1",
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "UPDATE t SET names = 'x'",
            "SET @tz = (SELECT time_zone FROM users WHERE id = ?)",
            "SET @v = CAST(x AS CHAR CHARACTER SET utf8mb4)",
            "SET @j = '{\"names\": 1}', @k = 'it''s time_zone'",
            "SET @now = @@time_zone",
        ] {
            assert!(!sets_mysql_time_zone_or_charset(sql), "{sql}");
        }
    }

    #[test]
    fn statements_that_may_leave_mysqls_read_only_mode_are_told_apart() {
        for sql in [
            "SET SESSION TRANSACTION READ WRITE",
            "set transaction isolation level serializable, read/**/write",
            "SET STATEMENT tx_read_only=0 FOR INSERT INTO t VALUES (1)",
            "/*!50000 SET @@session.TRANSACTION_READ_ONLY = OFF */",
            "SET `tx_read_only` = 0",
            "SET SESSION TRANSACTION READ /*!50000WRITE*/",
            "SET SESSION TRANSACTION READ /*M!100000WRITE*/",
            "/*!50000CALL*/ p()",
            "CALL p()",
            "BEGIN NOT ATOMIC EXECUTE IMMEDIATE CONCAT('SET SESSION TRANSACTION READ', ' WR', 'ITE'); END",
            "PREPARE s FROM @sql",
        ] {
            assert!(may_leave_read_only(sql), "{sql}");
        }
        for sql in [
            "SELECT * FROM orders WHERE id = ?",
            "SET STATEMENT max_statement_time = 1 FOR SELECT 1",
            "SELECT readonly, written, caller FROM t",
            "SHOW VARIABLES",
            "SELECT @@read_only, @@global.read_only",
            "SHOW VARIABLES LIKE '%read_only%'",
            "SELECT is_read_only FROM replicas",
        ] {
            assert!(!may_leave_read_only(sql), "{sql}");
        }
    }

    #[test]
    fn tsql_that_may_leave_session_state_is_told_apart() {
        for sql in [
            "EXEC sp_getapplock @Resource = 'job', @LockMode = 'Exclusive', @LockOwner = 'Session'",
            "exec sys.sp_set_session_context N'tenant', 7",
            "SET CONTEXT_INFO 0x01",
            "DECLARE c CURSOR GLOBAL FOR SELECT 1",
            "OPEN SYMMETRIC KEY k DECRYPTION BY PASSWORD = 'x'",
            "OPEN MASTER KEY DECRYPTION BY PASSWORD = 'x'",
            "CREATE TABLE ##shared (id int)",
            "EXEC sp_setapprole 'r', 'p'",
        ] {
            assert!(may_keep_mssql_session_state(sql), "{sql}");
        }
        for sql in [
            "SELECT * FROM orders WHERE id = @P1",
            "CREATE TABLE #mine (id int)",
            "SET NOCOUNT ON",
            "SELECT [open], [close] FROM prices WHERE status = 'open'",
            "SELECT name FROM master.sys.databases",
            "SELECT * FROM global_settings",
        ] {
            assert!(!may_keep_mssql_session_state(sql), "{sql}");
        }
    }

    #[test]
    fn nested_comments_are_read_in_one_pass() {
        assert_eq!(block_comment_end(" a /* b */ c */ SELECT", true), " SELECT");
        assert_eq!(block_comment_end(" a /* b */ c */ SELECT", false), " c */ SELECT");
        // `/*/` opens a comment and does not close it.
        assert_eq!(block_comment_end("/ x */ y", false), " y");
        assert_eq!(block_comment_end(" é */é", false), "é");
        // A statement of many openings is read in time growing with its
        // length, not its square (minutes for this one): no words in it.
        let hostile = format!("/* returning {}*/", "/* ".repeat(300_000));
        let started = std::time::Instant::now();
        assert_eq!(leading_words(&hostile, 1), [Vec::<String>::new()]);
        assert!(!writes_and_returns_rows(&hostile));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn leading_words_skip_comments() {
        assert_eq!(
            leading_words("  /* a */ -- b\n PRAGMA foreign_keys = OFF", 2),
            [["pragma", "foreign_keys"]]
        );
        assert_eq!(leading_words("BEGIN;", 3), [["begin"]]);
        assert_eq!(leading_words(" ;; /* a */ ;COMMIT TRAN", 2), [["commit", "tran"]]);
        assert!(controls_transaction(";COMMIT TRAN"));
        assert!(writes_and_returns_rows(
            ";WITH d AS (SELECT 1 AS a) DELETE FROM t OUTPUT deleted.*"
        ));
        assert_eq!(leading_words("/* unclosed", 1), [Vec::<String>::new()]);
        assert_eq!(leading_words("ROLLBACK TRAN @sp", 3), [["rollback", "tran", "@sp"]]);
    }

    #[test]
    fn every_engines_reading_of_comments_is_seen() {
        // PostgreSQL nests block comments, MySQL and SQLite do not.
        let both = leading_words("/* /* */ PRAGMA x */ SELECT 1", 1);
        assert!(both.contains(&vec!["pragma".to_string()]) && both.contains(&vec!["select".to_string()]));
        // PostgreSQL ends `--` at a carriage return; SQLite only at a newline.
        let both = leading_words("-- a\rPRAGMA x\nSELECT 1", 1);
        assert!(both.contains(&vec!["pragma".to_string()]) && both.contains(&vec!["select".to_string()]));
        // MySQL runs a versioned comment or skips it, by its version number.
        let both = leading_words("/*!99999 PRAGMA */ SELECT 1", 1);
        assert!(both.contains(&vec!["pragma".to_string()]) && both.contains(&vec!["select".to_string()]));
    }

    #[test]
    fn writes_that_return_rows_are_told_from_reads_and_plain_writes() {
        for sql in [
            "INSERT INTO t VALUES (1) RETURNING id",
            "delete from t returning *",
            "UPDATE t SET a = 1 RETURNING a",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING *",
            "WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone",
            "INSERT INTO t (id) OUTPUT inserted.id VALUES (1)",
            "/* a */ REPLACE INTO t VALUES (1) RETURNING id",
        ] {
            assert!(writes_and_returns_rows(sql), "{sql}");
        }
        for sql in [
            "SELECT output FROM logs",
            "select\treturning FROM t",
            "SELECT",
            "SELECT 1 AS returning_rows",
            "INSERT INTO t VALUES (1)",
            "INSERT INTO returning_orders VALUES (1)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "EXEC p @result OUTPUT",
        ] {
            assert!(!writes_and_returns_rows(sql), "{sql}");
        }
    }

    #[test]
    fn transaction_control_is_told_from_savepoints_and_blocks() {
        for sql in [
            "COMMIT",
            "commit work",
            "END",
            "ABORT",
            "ROLLBACK",
            "rollback and chain",
            "ROLLBACK TRANSACTION",
            "ROLLBACK WORK AND NO CHAIN",
            "BEGIN",
            "begin;",
            "BEGIN READ WRITE",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN IMMEDIATE",
            "BEGIN TRAN",
            "START TRANSACTION READ WRITE",
            "PREPARE TRANSACTION 'x'",
            "XA START 'x'",
            "/* hidden */ COMMIT",
            "# a MySQL comment\nCOMMIT",
            "/*!40101 COMMIT */",
            "/*M!100101 COMMIT */",
            "/*!99999 SELECT 1 */ COMMIT",
            "/* /* */ */ COMMIT",
            "/* /* */ COMMIT */",
            "--x\rCOMMIT",
            "ROLLBACK WORK RELEASE",
            "ROLLBACK WORK NO RELEASE",
            "BEGIN NOT DEFERRABLE",
        ] {
            assert!(controls_transaction(sql), "{sql}");
        }
        for sql in [
            "SAVEPOINT s",
            "ROLLBACK TO SAVEPOINT s",
            "ROLLBACK TO s",
            "ROLLBACK TRANSACTION TO SAVEPOINT s",
            "ROLLBACK TRAN s",
            "ROLLBACK TRAN @savepoint",
            "BEGIN NOT ATOMIC SELECT 1; END",
            "RELEASE SAVEPOINT s",
            "BEGIN TRY SELECT 1 END TRY BEGIN CATCH END CATCH",
            "SELECT 'COMMIT'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "INSERT INTO commits VALUES (1)",
        ] {
            assert!(!controls_transaction(sql), "{sql}");
        }
    }
}
