//! A small reader for `--flag value` and `--flag=value` command lines.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

/// The flags of a command line, one at a time.
pub struct Flags {
    args: VecDeque<String>,
    usage: &'static str,
}

impl Flags {
    pub fn new(args: impl IntoIterator<Item = String>, usage: &'static str) -> Flags {
        Flags { args: args.into_iter().collect(), usage }
    }

    /// The next flag and its `=value`, if written that way. `--help` is an error whose
    /// message is the usage text.
    pub fn next_flag(&mut self) -> Result<Option<Flag>, String> {
        let Some(arg) = self.args.pop_front() else { return Ok(None) };
        if arg == "-h" || arg == "--help" {
            return Err(self.usage.to_string());
        }
        if !arg.starts_with("--") {
            return Err(format!("unexpected argument {arg:?}\n\n{}", self.usage));
        }
        Ok(Some(match arg.split_once('=') {
            Some((name, value)) => Flag { name: name.to_string(), inline: Some(value.to_string()) },
            None => Flag { name: arg, inline: None },
        }))
    }

    /// The value of `flag`: after `=`, or the next argument.
    pub fn value(&mut self, flag: &Flag) -> Result<String, String> {
        flag.inline
            .clone()
            .or_else(|| self.args.pop_front())
            .ok_or_else(|| format!("{} needs a value\n\n{}", flag.name, self.usage))
    }

    pub fn seconds(&mut self, flag: &Flag) -> Result<Duration, String> {
        let v = self.value(flag)?;
        v.parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{} {v:?} is not a positive number", flag.name))
    }

    pub fn address(&mut self, flag: &Flag) -> Result<SocketAddr, String> {
        let v = self.value(flag)?;
        v.parse().map_err(|_| format!("{} {v:?} is not HOST:PORT", flag.name))
    }

    /// The error for a flag nobody knows.
    pub fn unknown(&self, flag: &Flag) -> String {
        format!("unknown flag {}\n\n{}", flag.name, self.usage)
    }
}

/// One flag as written.
pub struct Flag {
    pub name: String,
    inline: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(list: &[&str]) -> Flags {
        Flags::new(list.iter().map(|s| s.to_string()), "usage: x")
    }

    #[test]
    fn reads_both_spellings() {
        let mut f = flags(&["--a", "1", "--b=2"]);
        let a = f.next_flag().unwrap().unwrap();
        assert_eq!((a.name.as_str(), f.value(&a).unwrap().as_str()), ("--a", "1"));
        let b = f.next_flag().unwrap().unwrap();
        assert_eq!(f.value(&b).unwrap(), "2");
        assert!(f.next_flag().unwrap().is_none());
    }

    #[test]
    fn errors_name_the_flag() {
        let mut f = flags(&["--wait", "soon"]);
        let w = f.next_flag().unwrap().unwrap();
        assert_eq!(f.seconds(&w).unwrap_err(), "--wait \"soon\" is not a positive number");
        let mut f = flags(&["--addr"]);
        let a = f.next_flag().unwrap().unwrap();
        assert!(f.address(&a).unwrap_err().starts_with("--addr needs a value"));
        assert!(flags(&["stray"]).next_flag().err().unwrap().starts_with("unexpected argument \"stray\""));
        assert_eq!(flags(&["--help"]).next_flag().err().unwrap(), "usage: x");
    }
}
