//! What a statement's text tells before any engine parses it: its leading
//! words, after spaces and comments. Only for decisions where reading a
//! word wrong refuses or resets too much, never too little.

/// The first `n` words of `sql`, lowercased, after spaces and `--`, `#`
/// and `/* */` comments (MySQL's `/*! ... */` is read as code); fewer when
/// a non-word character (`;`, `(`) or the end comes first. `@` may start
/// a word (a T-SQL variable).
pub fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let mut words = Vec::with_capacity(n);
    let mut rest = sql;
    while words.len() < n {
        rest = skip_space(rest);
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

fn skip_space(mut rest: &str) -> &str {
    loop {
        rest = rest.trim_start();
        if let Some(code) = rest.strip_prefix("/*!") {
            // MySQL runs what is inside, after an optional version number.
            rest = code.trim_start_matches(|c: char| c.is_ascii_digit());
        } else if let Some(comment) = rest.strip_prefix("--").or_else(|| rest.strip_prefix('#')) {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = rest.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return rest;
        }
    }
}

/// Whether `sql` starts, commits or rolls back a transaction (not a
/// savepoint's), which inside a transaction handle would end the
/// transaction behind the handle's back.
pub fn controls_transaction(sql: &str) -> bool {
    let words = leading_words(sql, 3);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_words_skip_comments() {
        assert_eq!(
            leading_words("  /* a */ -- b\n PRAGMA foreign_keys = OFF", 2),
            ["pragma", "foreign_keys"]
        );
        assert_eq!(leading_words("BEGIN;", 3), ["begin"]);
        assert!(leading_words("/* unclosed", 1).is_empty());
        assert_eq!(leading_words("ROLLBACK TRAN @sp", 3), ["rollback", "tran", "@sp"]);
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
