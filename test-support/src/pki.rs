//! Throwaway certificate authorities for fixtures: each test part gets its own
//! CA, so a test can only trust what it deliberately trusts.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{Error, Result};

fn pki_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Other(format!("generating {what}: {e}"))
}

/// A certificate and its private key, as PEM and as DER.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
    /// PKCS#8.
    pub key_der: Vec<u8>,
}

/// A self-signed ECDSA P-256 CA that issues server and client certificates.
pub struct TestCa {
    cert_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(pki_error("a CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error("a CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(pki_error("a CA"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        &self.cert_der
    }

    /// A server certificate for DNS names and/or IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(pki_error("a server certificate"))?;
        for name in names {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        (*name)
                            .try_into()
                            .map_err(pki_error("a server certificate name"))?,
                    ),
                });
        }
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate; Kubernetes reads the user from the common name
    /// and the group from the organization. One group at most: rcgen keeps
    /// one value per attribute type, and silently dropping a group would
    /// hand a test fewer rights than it asked for.
    pub fn issue_client(&self, common_name: &str, organizations: &[&str]) -> Result<IssuedCert> {
        if organizations.len() > 1 {
            return Err(Error::Other(format!(
                "a test client certificate carries at most one group, not {organizations:?}"
            )));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(pki_error("a client certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for o in organizations {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<IssuedCert> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(pki_error("a leaf key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_error("a leaf"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }
}

/// An ECDSA P-256 key pair as PEM `(private PKCS#8, public SPKI)`, e.g. the
/// API server's service-account signing key.
pub fn signing_key_pem() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(pki_error("a signing key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
