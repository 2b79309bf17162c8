//! The parts of the AWS CLI's shared files (`~/.aws/config`, `~/.aws/credentials`) that an S3
//! lake needs, so that the same profile that drives `aws s3` drives sensorlake: `region`,
//! `endpoint_url`, and static keys (`aws_access_key_id`, `aws_secret_access_key`,
//! `aws_session_token`) of the profile named by `AWS_PROFILE` (else `default`).
//!
//! As in the AWS CLI, environment variables win over the files, and `AWS_CONFIG_FILE` /
//! `AWS_SHARED_CREDENTIALS_FILE` move the files. Not supported (a warning says so): SSO,
//! `role_arn`, `credential_process` — use environment variables or the instance's role there.

use std::collections::HashMap;
use std::path::PathBuf;

/// What a profile sets.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AwsProfile {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl AwsProfile {
    /// Reads the profile, looking variables up with `env` (the process environment in
    /// production, a map in tests). Missing files are no profile; unreadable ones are warned
    /// about and skipped.
    pub(crate) fn load(env: &dyn Fn(&str) -> Option<String>) -> AwsProfile {
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let path = |var: &str, default: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(default)))
        };
        let read = |p: Option<PathBuf>| -> HashMap<String, HashMap<String, String>> {
            let Some(p) = p else { return HashMap::new() };
            match std::fs::read_to_string(&p) {
                Ok(text) => parse_ini(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "Cannot read an AWS shared file; ignoring it");
                    HashMap::new()
                }
            }
        };
        let config = read(path("AWS_CONFIG_FILE", ".aws/config"));
        let credentials = read(path("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"));
        // In `config` a profile is `[profile NAME]`, except `[default]`; in `credentials` it is
        // `[NAME]`.
        let in_config = config
            .get(&format!("profile {name}"))
            .or_else(|| (name == "default").then(|| config.get("default")).flatten());
        let in_credentials = credentials.get(&name);
        let get = |key: &str| {
            in_credentials
                .and_then(|s| s.get(key))
                .or_else(|| in_config.and_then(|s| s.get(key)))
                .cloned()
        };
        for unsupported in [
            "sso_session",
            "sso_start_url",
            "role_arn",
            "credential_process",
        ] {
            if get(unsupported).is_some() {
                tracing::warn!(profile = %name, setting = unsupported,
                    "This AWS profile setting is not supported by sensorlake; set AWS_* variables (or use the instance's role) instead");
            }
        }
        AwsProfile {
            region: get("region"),
            endpoint_url: get("endpoint_url"),
            access_key_id: get("aws_access_key_id"),
            secret_access_key: get("aws_secret_access_key"),
            session_token: get("aws_session_token"),
        }
    }

    /// Applies what the environment does not already set to `builder`.
    pub(crate) fn apply(
        self,
        env: &dyn Fn(&str) -> Option<String>,
        mut builder: object_store::aws::AmazonS3Builder,
    ) -> object_store::aws::AmazonS3Builder {
        let unset = |vars: &[&str]| vars.iter().all(|v| env(v).is_none());
        if let Some(region) = self
            .region
            .filter(|_| unset(&["AWS_REGION", "AWS_DEFAULT_REGION"]))
        {
            builder = builder.with_region(region);
        }
        if let Some(url) = self
            .endpoint_url
            .filter(|_| unset(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"]))
        {
            // A plain-HTTP endpoint written in the profile is meant (the AWS CLI takes it).
            if url.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            builder = builder.with_endpoint(url);
        }
        if let (true, Some(id), Some(secret)) = (
            unset(&["AWS_ACCESS_KEY_ID"]),
            self.access_key_id,
            self.secret_access_key,
        ) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = self.session_token {
                builder = builder.with_token(token);
            }
        }
        builder
    }
}

/// Sections of an INI file: `[name]` headers, `key = value` lines, `#`/`;` comments; keys
/// lower-cased, values trimmed. Indented lines (nested `s3 =` blocks) are skipped.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_the_named_profile_from_both_files_credentials_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = us-east-1\n\n[profile lake]\nregion = eu-west-1 \n\
             endpoint_url = http://127.0.0.1:9000\ns3 =\n  addressing_style = path\n\
             aws_access_key_id = FROMCONFIG\n# a comment\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[lake]\naws_access_key_id = AKIA1\naws_secret_access_key = s3cr3t\n",
        )
        .unwrap();
        let home = dir.path().display().to_string();
        let p = AwsProfile::load(&env_of(&[
            ("HOME", home.clone()),
            ("AWS_PROFILE", "lake".into()),
        ]));
        assert_eq!(
            p,
            AwsProfile {
                region: Some("eu-west-1".into()),
                endpoint_url: Some("http://127.0.0.1:9000".into()),
                access_key_id: Some("AKIA1".into()),
                secret_access_key: Some("s3cr3t".into()),
                session_token: None,
            }
        );
        let d = AwsProfile::load(&env_of(&[("HOME", home)]));
        assert_eq!(d.region.as_deref(), Some("us-east-1"));
        assert_eq!(d.access_key_id, None);
    }

    #[test]
    fn no_files_is_no_profile_and_moved_files_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let none = AwsProfile::load(&env_of(&[("HOME", dir.path().display().to_string())]));
        assert_eq!(none, AwsProfile::default());
        let conf = dir.path().join("elsewhere.ini");
        std::fs::write(&conf, "[default]\nregion=ap-south-1\n").unwrap();
        let moved = AwsProfile::load(&env_of(&[("AWS_CONFIG_FILE", conf.display().to_string())]));
        assert_eq!(moved.region.as_deref(), Some("ap-south-1"));
    }
}
