//! File names from other nodes: a sender's name is only a suggestion. It
//! must be one plain name (no directory part, nothing that climbs out of
//! the files directory, no name a platform reserves) or it is refused with
//! a [`FileNameError`]; a name already taken gets a numbered suffix.

/// The longest name, in bytes (what common file systems allow).
pub const MAX_NAME_LEN: usize = 255;

/// Why a file name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileNameError {
    /// No name at all.
    #[error("the file name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("the file name is {0} bytes long (at most {MAX_NAME_LEN})")]
    TooLong(usize),
    /// `.` or `..`.
    #[error("the file name {0:?} names a directory")]
    Traversal(String),
    /// A path: `/`, `\` or a drive (`C:`).
    #[error("the file name holds a path separator or drive ({0:?}): only a plain name is taken")]
    Separator(char),
    /// NUL or another control character.
    #[error("the file name holds a control character (U+{0:04X})")]
    Control(u32),
    /// A name a platform reserves (`CON`, `NUL`, `COM1`, …), with or
    /// without an extension.
    #[error("the file name {0:?} is reserved on some platforms")]
    Reserved(String),
    /// A character some platforms refuse in names (`<>"|?*`).
    #[error("the file name holds {0:?}, which some platforms refuse")]
    Forbidden(char),
    /// Starts with `.` (hidden, and where the SDK keeps its own state) or
    /// ends with `.` or a space (which some platforms drop).
    #[error("the file name {0:?} starts with a dot or ends with a dot or space")]
    Hidden(String),
}

impl FileNameError {
    /// A stable code for JSON and bindings.
    pub fn code(&self) -> &'static str {
        match self {
            FileNameError::Empty => "empty",
            FileNameError::TooLong(_) => "too_long",
            FileNameError::Traversal(_) => "traversal",
            FileNameError::Separator(_) => "separator",
            FileNameError::Control(_) => "control_character",
            FileNameError::Reserved(_) => "reserved",
            FileNameError::Forbidden(_) => "forbidden_character",
            FileNameError::Hidden(_) => "hidden",
        }
    }
}

/// Names Windows reserves for devices (any case, any extension).
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM0", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7",
    "COM8", "COM9", "LPT0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
    "CONIN$", "CONOUT$",
];

/// Format characters that change how a name reads without showing
/// (bidirectional overrides, zero-width characters, separators): a
/// `report\u{202E}fdp.exe` would show as `reportexe.pdf`.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Checks `name` and returns it unchanged if it is one plain, portable
/// file name.
pub fn check_name(name: &str) -> Result<&str, FileNameError> {
    if name.is_empty() {
        return Err(FileNameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(FileNameError::TooLong(name.len()));
    }
    if name == "." || name == ".." {
        return Err(FileNameError::Traversal(name.to_owned()));
    }
    for c in name.chars() {
        if c == '/' || c == '\\' || c == ':' {
            return Err(FileNameError::Separator(c));
        }
        if c.is_control() || invisible(c) {
            return Err(FileNameError::Control(u32::from(c)));
        }
        if matches!(c, '<' | '>' | '"' | '|' | '?' | '*') {
            return Err(FileNameError::Forbidden(c));
        }
    }
    if name.starts_with('.') || name.ends_with('.') || name.ends_with(' ') {
        return Err(FileNameError::Hidden(name.to_owned()));
    }
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem)) {
        return Err(FileNameError::Reserved(name.to_owned()));
    }
    Ok(name)
}

/// The `n`th name to try for `name` when it is taken: `n = 0` is `name`
/// itself, then `stem (1).ext`, `stem (2).ext`, … (kept within
/// [`MAX_NAME_LEN`] by shortening the stem on a character boundary).
pub fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    // A long "extension" is part of the stem (the suffix must fit).
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 32 => name.split_at(i),
        _ => (name, ""),
    };
    let suffix = format!(" ({n}){ext}");
    let mut keep = MAX_NAME_LEN.saturating_sub(suffix.len()).min(stem.len());
    while !stem.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &stem[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        for ok in [
            "report.pdf",
            "photo 1.JPG",
            "Übersicht – 2026.txt",
            "a",
            "my.con",
            "COM10",
            "x..y",
        ] {
            assert_eq!(check_name(ok), Ok(ok), "{ok}");
        }
        assert!(check_name(&"é".repeat(127)).is_ok());
    }

    #[test]
    fn paths_traversal_and_reserved_names_are_refused() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (".", "traversal"),
            ("..", "traversal"),
            ("../etc/passwd", "separator"),
            ("/etc/passwd", "separator"),
            ("a/b", "separator"),
            ("..\\..\\boot.ini", "separator"),
            ("C:evil", "separator"),
            ("nul\0byte", "control_character"),
            ("line\nbreak", "control_character"),
            ("bell\u{7}", "control_character"),
            ("esc\u{1b}[31m", "control_character"),
            ("del\u{7f}", "control_character"),
            ("sep\u{2028}", "control_character"),
            ("invoice\u{202E}fdp.exe", "control_character"),
            ("zero\u{200B}width", "control_character"),
            ("CON", "reserved"),
            ("nul.txt", "reserved"),
            ("Com1.tar.gz", "reserved"),
            ("lpt9", "reserved"),
            ("con.d", "reserved"),
            ("aux .txt", "reserved"),
            ("a<b", "forbidden_character"),
            ("what?", "forbidden_character"),
            ("star*", "forbidden_character"),
            (".bashrc", "hidden"),
            (".partial", "hidden"),
            ("trailing.", "hidden"),
            ("trailing ", "hidden"),
        ];
        for (name, code) in cases {
            let e = check_name(name).unwrap_err();
            assert_eq!(e.code(), *code, "{name:?}: {e}");
        }
        assert_eq!(
            check_name(&"a".repeat(256)).unwrap_err(),
            FileNameError::TooLong(256)
        );
    }

    #[test]
    fn numbered_names_keep_the_extension_and_the_length_limit() {
        assert_eq!(numbered("a.txt", 0), "a.txt");
        assert_eq!(numbered("a.txt", 1), "a (1).txt");
        assert_eq!(numbered("archive.tar.gz", 2), "archive.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
        let long = format!("{}.bin", "é".repeat(125));
        let n = numbered(&long, 12);
        assert!(n.len() <= MAX_NAME_LEN, "{}", n.len());
        assert!(n.ends_with(" (12).bin"));
        assert!(check_name(&n).is_ok());
        // A long extension: the suffix still fits.
        let odd = format!("a.{}", "x".repeat(252));
        let n = numbered(&odd, 7);
        assert!(n.len() <= MAX_NAME_LEN && n.ends_with(" (7)"), "{n}");
    }
}
