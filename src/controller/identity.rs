//! The controller's TLS identity: a certificate and key given with `--tls-cert`/`--tls-key`, or
//! a self-signed one generated on first start and kept in `DATA/tls/` (key mode 0600). Its
//! fingerprint is written to `DATA/fingerprint` so the CLI can pin it.

use futures_rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use futures_rustls::rustls;
use futures_rustls::TlsAcceptor;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// What the listeners need to speak TLS, and the identity to show to agents.
pub struct ServerTls {
    /// Wraps accepted connections.
    pub acceptor: TlsAcceptor,
    /// `sha256:HEX` of the certificate's public key.
    pub fingerprint: String,
    /// True if the identity was generated here (self-signed).
    pub self_signed: bool,
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Generate a self-signed identity in `dir` unless one is there already.
fn ensure_self_signed(dir: &Path) -> Result<(), String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    super::logs::create_private_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            names.push(h.to_string());
        }
    }
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| format!("cannot make a TLS identity: {e}"))?;
    write_file(&key, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert, ck.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Load the identity: from `cert`/`key` if given, else the self-signed one in `DATA/tls/`
/// (generated if missing). Writes `DATA/fingerprint`.
pub fn load(data: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<ServerTls, String> {
    let dir = data.join("tls");
    let (cert, key, self_signed) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), false),
        (None, None) => {
            ensure_self_signed(&dir)?;
            (dir.join("cert.pem"), dir.join("key.pem"), true)
        }
        _ => return Err("give both --tls-cert and --tls-key, or neither (for a self-signed identity)".into()),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", cert.display()))?;
    let first = chain.first().ok_or_else(|| format!("{}: no PEM certificate found", cert.display()))?;
    let fingerprint = crate::tls::fingerprint(first)?;
    let pk = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| format!("cannot read the private key in {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, pk)
        .map_err(|e| format!("TLS certificate {} and key {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    write_file(&data.join("fingerprint"), format!("{fingerprint}\n").as_bytes(), 0o644)?;
    Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)), fingerprint, self_signed })
}
