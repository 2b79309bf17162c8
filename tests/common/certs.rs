//! Certificates for the TLS tests, generated with the `openssl` command-line tool into a
//! scratch folder: a CA, a server certificate for `localhost` (SAN DNS:localhost and
//! IP:127.0.0.1), a client certificate signed by the CA, and a rogue self-signed client
//! certificate with the same subject. EC P-256 keys, valid for two days.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `openssl ARGS` (split at whitespace) in `dir`, panicking with its output when it
/// fails, or with how to install it when it is missing.
pub fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the `openssl` command is needed to generate the test certificates ({e}): \
                 install the Debian package `openssl` (scripts/test does this for you)"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` options for a new unencrypted EC P-256 key written to `KEY`.
pub const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout";

/// A CA and the certificates the TLS tests use, in one folder.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Generates `ca`, `server`, `client` and `rogue` (`.pem` certificate, `.key` key).
    pub fn generate() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user: it must be able to read them.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let certs = Certs { dir };
        certs.run(&format!(
            "req -x509 {EC_KEY} ca.key -out ca.pem -days 2 -subj /CN=sensorlake-test-CA \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        certs.issue(
            "server",
            "localhost",
            "serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            &format!("{EC_KEY} server.key"),
        );
        certs.issue(
            "client",
            "sensorlake-client",
            "clientAuth",
            "",
            &format!("{EC_KEY} client.key"),
        );
        // Self-signed, with the real client's subject: only the signature gives it away.
        certs.run(&format!(
            "req -x509 {EC_KEY} rogue.key -out rogue.pem -days 2 -subj /CN=sensorlake-client"
        ));
        certs
    }

    /// Runs `openssl ARGS` in the folder and keeps every file readable by the broker's user
    /// (keys included: they are a test's throwaway keys).
    pub fn run(&self, args: &str) {
        use std::os::unix::fs::PermissionsExt;
        openssl(self.dir.path(), args);
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }

    /// Issues `NAME.pem` for `/CN=CN`, signed by the CA, for the extended key usage `usage`
    /// plus the extension line `extra`; `key_args` are the key options of `openssl req`
    /// (a new key, or `-key FILE`).
    pub fn issue(&self, name: &str, cn: &str, usage: &str, extra: &str, key_args: &str) {
        std::fs::write(
            self.path(&format!("{name}.ext")),
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={usage}\n{extra}\n"
            ),
        )
        .unwrap();
        self.run(&format!("req {key_args} -out {name}.csr -subj /CN={cn}"));
        self.run(&format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem \
             -days 2 -extfile {name}.ext"
        ));
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file in the folder, as a string for a config file.
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// The Mosquitto settings of a TLS listener with these certificates; `extra` is appended
    /// (e.g. `require_certificate true`).
    pub fn mosquitto_listener(&self, extra: &str) -> String {
        format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n{extra}\n",
            self.file("ca.pem"),
            self.file("server.pem"),
            self.file("server.key")
        )
    }
}
