//! Certificates minted per test with openssl (scripts/test.sh installs it): a CA, and leaf
//! certificates it signs for 127.0.0.1 and `localhost`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (scripts/test.sh installs it)");
    assert!(st.success(), "openssl {args:?}");
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A certificate authority in `dir`: `NAME.pem` is its certificate.
pub struct Ca {
    dir: PathBuf,
    name: String,
}

impl Ca {
    /// Mints CA `name` (`NAME.pem`, `NAME.key`) in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        let subject = format!("/CN=openinfer-test-{name}");
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
        args.extend(EC);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &pem,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
        Ca {
            dir: dir.to_path_buf(),
            name: name.into(),
        }
    }

    /// The CA's certificate.
    pub fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// Mints `LEAF.pem` / `LEAF.key` for 127.0.0.1 and `localhost`, for `usage`
    /// (`serverAuth`, `clientAuth`, or both comma-separated); returns (cert, key).
    pub fn leaf(&self, leaf: &str, usage: &str) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        let (key, csr, pem, ext) = (
            format!("{leaf}.key"),
            format!("{leaf}.csr"),
            format!("{leaf}.pem"),
            format!("{leaf}.ext"),
        );
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        let mut req = vec!["req", "-subj", "/CN=openinfer-test"];
        req.extend(EC);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        let (ca_pem, ca_key) = (format!("{}.pem", self.name), format!("{}.key", self.name));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
        );
        (dir.join(pem), dir.join(key))
    }
}
