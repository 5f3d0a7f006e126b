//! The workload's final environment. (Entrypoint + Cmd, Env and WorkingDir with the
//! user's overrides are composed on the host, by kiln-sandbox, into the run spec.)

use kiln_protocol::DEFAULT_PATH;

use crate::Session;

/// The workload's environment: USER, LOGNAME, HOME and SHELL from the session, then
/// `env` (so an explicit value wins, as Docker lets an image's HOME win), PATH defaulted
/// when absent; one entry per name, at the position of its first appearance with the
/// value of its last.
pub fn workload_env(session: &Session, env: &[String]) -> Vec<String> {
    let mut merged: Vec<String> = Vec::new();
    let path_default = format!("PATH={DEFAULT_PATH}");
    let all = session.env().into_iter().chain(env.iter().cloned());
    for entry in all {
        let name = entry.split('=').next().unwrap_or_default().to_owned();
        match merged
            .iter_mut()
            .find(|e| e.split('=').next() == Some(name.as_str()))
        {
            Some(existing) => *existing = entry,
            None => merged.push(entry),
        }
    }
    if !merged.iter().any(|e| e.starts_with("PATH=")) {
        merged.push(path_default);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn session_variables_are_defaults_and_path_is_filled_in() {
        let session = Session {
            user: "sandbox".into(),
            home: "/sandbox".into(),
            shell: "/bin/sh".into(),
        };
        assert_eq!(
            workload_env(&session, &strings(&["A=1", "HOME=/root", "A=2"])),
            [
                "USER=sandbox",
                "LOGNAME=sandbox",
                "HOME=/root",
                "SHELL=/bin/sh",
                "A=2",
                &format!("PATH={DEFAULT_PATH}")
            ]
        );
        let env = workload_env(&session, &strings(&["PATH=/x"]));
        assert_eq!(env.last().unwrap(), "PATH=/x");
    }
}
