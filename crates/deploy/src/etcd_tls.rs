//! Certificates for etcd's client and peer traffic (`--etcd-tls`), made by the deploy step
//! when none are given: one certificate authority per deployment, and one certificate per
//! member naming every address it is reached by. Each member serves its clients and its
//! peers with it, asks both for a certificate of the same authority (`--client-cert-auth`,
//! `--peer-client-cert-auth`), and its replica presents it as a client: nobody without a
//! certificate of this deployment can read or write the service's records, or join its
//! cluster.
//!
//! The authority's key signs the member certificates and is then dropped: it is never
//! written anywhere, so no one can make another member later (a new deployment makes a
//! new authority).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

use crate::error::{DeployError, Result};

/// What a deployment's etcd members and replicas are given.
#[derive(Clone)]
pub struct EtcdCertificates {
    /// The authority's certificate (PEM): what every member and replica trusts.
    pub ca: String,
    /// One per member, in member order.
    pub members: Vec<MemberCertificate>,
}

/// One member's certificate and key (PEM).
#[derive(Clone)]
pub struct MemberCertificate {
    /// The certificate, for serving clients and peers and for presenting as a client.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl std::fmt::Debug for MemberCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberCertificate").field("key", &"(secret)").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EtcdCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCertificates").field("members", &self.members.len()).finish_non_exhaustive()
    }
}

/// Where one member's files are on disk: what etcd's `--cert-file` and the replica's
/// `BR2K_ETCD_CERT_FILE` and friends name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// The authority's certificate.
    pub ca: PathBuf,
    /// The member's certificate.
    pub cert: PathBuf,
    /// The member's key (mode 0600).
    pub key: PathBuf,
}

impl EtcdTlsFiles {
    /// The etcd flags that serve clients and peers with these files and ask both for a
    /// certificate of the same authority: nobody else reads the records or joins.
    pub fn etcd_flags(&self) -> Vec<String> {
        let (ca, cert, key) = (self.ca.display(), self.cert.display(), self.key.display());
        vec![
            format!("--cert-file={cert}"),
            format!("--key-file={key}"),
            format!("--trusted-ca-file={ca}"),
            "--client-cert-auth=true".into(),
            format!("--peer-cert-file={cert}"),
            format!("--peer-key-file={key}"),
            format!("--peer-trusted-ca-file={ca}"),
            "--peer-client-cert-auth=true".into(),
        ]
    }
}

impl EtcdCertificates {
    /// Makes an authority for `service` and a certificate per member, member `i` named by
    /// every host or IP address in `hosts[i]` (with `localhost` and `127.0.0.1` added:
    /// each replica reaches its own member there).
    ///
    /// # Errors
    /// A host that cannot go in a certificate (not ASCII), or the key cannot be made.
    pub fn make(service: &str, hosts: &[Vec<String>]) -> Result<Self> {
        let failed = |what: &str, e: rcgen::Error| DeployError::Invalid(format!("cannot make {what}: {e}"));
        let ca_key = KeyPair::generate().map_err(|e| failed("the etcd certificate authority's key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("the authority", e))?;
        params.distinguished_name.push(DnType::CommonName, format!("br2k etcd CA for {service}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).map_err(|e| failed("the authority", e))?;
        let mut members = Vec::with_capacity(hosts.len());
        for (i, names) in hosts.iter().enumerate() {
            let mut sans = names.clone();
            for local in ["localhost", "127.0.0.1"] {
                if !sans.iter().any(|n| n == local) {
                    sans.push(local.to_owned());
                }
            }
            let mut params = CertificateParams::new(sans).map_err(|e| {
                DeployError::Invalid(format!("member {}'s names {names:?} cannot go in a certificate: {e}", i + 1))
            })?;
            params.distinguished_name.push(DnType::CommonName, format!("{service} etcd member {}", i + 1));
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().map_err(|e| failed("a member's key", e))?;
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(|e| failed("a member's certificate", e))?;
            members.push(MemberCertificate { cert: cert.pem(), key: key.serialize_pem() });
        }
        Ok(Self { ca: ca.pem(), members })
    }

    /// Writes member `i`'s files into `dir`; where they are.
    ///
    /// # Errors
    /// The directory or a file cannot be written.
    pub fn write_member(&self, i: usize, dir: &Path) -> Result<EtcdTlsFiles> {
        let files = EtcdTlsFiles { ca: dir.join("ca.crt"), cert: dir.join("member.crt"), key: dir.join("member.key") };
        let member = &self.members[i];
        // All three private (0600, synced, renamed into place): only the node's own
        // processes read them.
        for (path, text) in [(&files.ca, &self.ca), (&files.cert, &member.cert), (&files.key, &member.key)] {
            br2k_oci::private_file::write(path, text.as_bytes())?;
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_gets_a_certificate_of_one_authority_naming_its_addresses() {
        let hosts = vec![vec!["10.213.1.11".to_owned()], vec!["logserver-2.team-a.svc".to_owned()]];
        let made = EtcdCertificates::make("logserver", &hosts).unwrap();
        assert!(made.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(made.members.len(), 2);
        for member in &made.members {
            assert!(member.cert.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(member.key.contains("PRIVATE KEY"));
        }
        assert!(!format!("{made:?}").contains("PRIVATE"), "Debug never shows a key");
        let dir = tempfile::tempdir().unwrap();
        let files = made.write_member(1, dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), made.members[1].cert);
    }
}
