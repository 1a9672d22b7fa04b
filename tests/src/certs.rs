//! Certificate authorities made at test time (rcgen) for the tests that
//! need more than the harness's one [`crate::Pki`]: client certificates for
//! mutual TLS (a CA the edge trusts, another CA it does not, an expired
//! certificate, one whose names no policy allows) and a device's own server
//! certificate, from a CA the edge has never seen, for passthrough.
//!
//! It writes PEM files and hands back their paths; it opens no socket and
//! knows nothing about tether.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A certificate authority: its certificate (as a PEM file) and what signs.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate, PEM.
    pub pem: PathBuf,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client (extended key usage clientAuth).
    Client,
    /// A TLS server (extended key usage serverAuth).
    Server,
}

/// A calendar day: (year, month, day).
pub type Day = (i32, u8, u8);

/// A leaf certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8).
    pub key: PathBuf,
    /// The subject's common name.
    pub common_name: String,
}

impl Authority {
    /// A self-signed CA named `common_name`, written to `dir/<stem>.pem`.
    pub fn new(dir: &Path, stem: &str, common_name: &str) -> Authority {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("self-sign ca");
        let pem = dir.join(format!("{stem}.pem"));
        std::fs::write(&pem, cert.pem()).expect("write ca pem");
        Authority { cert, key, pem }
    }

    /// Its certificate as PEM text.
    pub fn pem_text(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `usage` with subject CN `common_name` and DNS SANs `sans`,
    /// valid over `validity` (from, to; None = rcgen's defaults, 1975 to
    /// 4096), written to `dir/<stem>.crt` and `.key`.
    pub fn issue(
        &self,
        dir: &Path,
        stem: &str,
        usage: Usage,
        common_name: &str,
        sans: &[&str],
        validity: Option<(Day, Day)>,
    ) -> Leaf {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
            p.not_before = rcgen::date_time_ymd(y0, m0, d0);
            p.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        let crt = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&crt, cert.pem()).expect("write leaf");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        Leaf {
            cert: crt,
            key: k,
            common_name: common_name.to_owned(),
        }
    }
}

/// The client certificates of the mutual-TLS tests. Every "good" name is
/// under [`ClientPki::ALLOWED`]'s pattern; `wrong_name` is not.
pub struct ClientPki {
    /// The CA the edge's policies trust.
    pub ca: Authority,
    /// A CA no policy names.
    pub other_ca: Authority,
    /// Signed by `ca`, currently valid, name allowed: passes.
    pub valid: Leaf,
    /// Signed by `ca`, name allowed, expired in 2021.
    pub expired: Leaf,
    /// Signed by `ca`, currently valid, name not allowed.
    pub wrong_name: Leaf,
    /// Signed by `other_ca`, currently valid, name allowed.
    pub foreign: Leaf,
}

impl ClientPki {
    /// The allowed-names pattern the good certificates match.
    pub const ALLOWED: &'static str = "*.devices.example";
    /// The valid certificate's name (CN and DNS SAN).
    pub const VALID_NAME: &'static str = "cam-1.devices.example";

    /// Generates every CA and certificate under `dir`.
    pub fn generate(dir: &Path) -> ClientPki {
        let ca = Authority::new(dir, "client-ca", "tether test client CA");
        let other_ca = Authority::new(dir, "other-ca", "some other CA");
        let n = Self::VALID_NAME;
        let valid = ca.issue(dir, "client-valid", Usage::Client, n, &[n], None);
        let expired = ca.issue(
            dir,
            "client-expired",
            Usage::Client,
            "cam-2.devices.example",
            &["cam-2.devices.example"],
            Some(((2020, 1, 1), (2021, 1, 1))),
        );
        let wrong_name = ca.issue(
            dir,
            "client-wrong-name",
            Usage::Client,
            "laptop.other.example",
            &["laptop.other.example"],
            None,
        );
        let foreign = other_ca.issue(dir, "client-foreign", Usage::Client, n, &[n], None);
        ClientPki {
            ca,
            other_ca,
            valid,
            expired,
            wrong_name,
            foreign,
        }
    }
}
