//! TLS pieces shared by the agent, the controller and the CLI: the controller's identity
//! fingerprint (SHA-256 of its certificate's public key) and the client-side certificate checks.
//!
//! A client trusts the controller in one of three ways: the built-in webpki roots plus any CA given
//! with `--cert` (a certificate from a real CA), a pinned fingerprint (`--instance-identity`, the
//! default for the controller's own self-signed identity), or, never by default, no check at all
//! (`--no-certificate-check`). Whatever TLS decides, the HMAC handshake and the per-frame tags still
//! authenticate the controller to the agent.

use futures_rustls::pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};
use futures_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use futures_rustls::rustls::crypto::{self, CryptoProvider};
use futures_rustls::rustls::{self, DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// SHA-256 of the certificate's SubjectPublicKeyInfo.
pub fn fingerprint_bytes(cert: &CertificateDer<'_>) -> Result<[u8; 32], String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("unreadable certificate: {e:?}"))?;
    let spki = ee.subject_public_key_info();
    let d = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

/// The printable form of a fingerprint: `sha256:` and 64 hex digits.
pub fn show(fp: &[u8; 32]) -> String {
    format!("sha256:{}", crate::auth::hex(fp))
}

/// The printable fingerprint of a certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Result<String, String> {
    fingerprint_bytes(cert).map(|f| show(&f))
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of_pem_file(path: &Path) -> Result<String, String> {
    let cert = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .next()
        .ok_or_else(|| format!("{}: no PEM certificate found", path.display()))?
        .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
    fingerprint(&cert)
}

/// Parse a fingerprint as printed (`sha256:HEX`), also without the prefix or with `:` between
/// byte pairs.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "bad instance identity {s:?}: expected sha256: and 64 hex digits, as `wisp node add` prints it"
        )
    };
    let t = s.trim();
    let t = t.strip_prefix("sha256:").or_else(|| t.strip_prefix("SHA256:")).unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(digits, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// Why a pinned certificate was refused, as rustls reports certificate errors, so a client can
/// tell a certificate it does not trust from a handshake that failed for another reason.
#[derive(Debug)]
struct PinError(String);

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinError {}

fn untrusted(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
        PinError(why),
    ))))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// Accepts exactly the controller whose public key has the pinned fingerprint (names and CAs do
/// not matter), still checking that the peer holds the key.
#[derive(Debug)]
struct Pinned {
    want: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// Accepts any certificate (`--no-certificate-check`), still checking the handshake signature.
#[derive(Debug)]
struct Unchecked {
    provider: Arc<CryptoProvider>,
}

fn tls12(
    p: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    crypto::verify_tls12_signature(message, cert, dss, &p.signature_verification_algorithms)
}

fn tls13(
    p: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    crypto::verify_tls13_signature(message, cert, dss, &p.signature_verification_algorithms)
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint_bytes(end_entity).map_err(untrusted)?;
        if crate::auth::constant_time_eq(&got, &self.want) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(untrusted(format!(
                "the server's identity is {}, not the pinned {} (--instance-identity): another server, \
                 or the controller's identity changed",
                show(&got),
                show(&self.want)
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12(&self.provider, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13(&self.provider, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12(&self.provider, message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13(&self.provider, message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// How a client decides to trust the controller's certificate.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Extra CA certificates (PEM) besides the webpki roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Pinned public-key fingerprint; when set, names and CAs are not checked.
    pub pin: Option<[u8; 32]>,
    /// Accept any certificate.
    pub insecure: bool,
}

impl Trust {
    /// The rustls client configuration for this trust.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        if self.insecure {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked { provider }))
                .with_no_client_auth());
        }
        if let Some(want) = self.pin {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned { want, provider }))
                .with_no_client_auth());
        }
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = &self.ca_file {
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read --cert {}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("--cert {}: no PEM certificate found", path.display()));
            }
        }
        Ok(builder.with_root_certificates(roots).with_no_client_auth())
    }
}

/// The advice added to a failed TLS handshake.
pub const TLS_ADVICE: &str = "for the controller's own (self-signed) identity give --instance-identity \
     FINGERPRINT as `wisp node add` prints it; for a private CA give --cert CA.pem; \
     --no-certificate-check skips the check (unsafe)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_their_printed_forms() {
        let fp = [0xabu8; 32];
        let shown = show(&fp);
        assert_eq!(parse_fingerprint(&shown).unwrap(), fp);
        assert_eq!(parse_fingerprint(&shown["sha256:".len()..]).unwrap(), fp);
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")).unwrap(), fp);
        assert!(parse_fingerprint("sha256:abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        // 64 bytes whose pairs split a character: refused, not a panic.
        assert!(parse_fingerprint(&format!("a{}b", "é".repeat(31))).is_err());
    }
}
