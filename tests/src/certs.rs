//! Certificates made in the tests: a CA, the store's server certificate and workloads' client
//! certificates carrying SPIFFE ids, as PEM files; and an HTTP client that presents one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct PemFiles {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// A test certificate authority writing into `dir`.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pki({})", self.name)
    }
}

impl Pki {
    /// A new CA called `name`; its certificate is written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca,
        }
    }

    /// The CA certificate's file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    fn issue(&self, file: &str, params: CertificateParams) -> PemFiles {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let files = PemFiles {
            cert: self.dir.join(format!("{}-{file}.pem", self.name)),
            key: self.dir.join(format!("{}-{file}-key.pem", self.name)),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A server certificate for `idempotency-store`, `localhost` and 127.0.0.1.
    pub fn server(&self, file: &str) -> PemFiles {
        let params = CertificateParams::new(vec![
            "idempotency-store".to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        self.issue(file, params)
    }

    /// A workload's client certificate whose URI SAN is `spiffe`.
    pub fn workload(&self, file: &str, spiffe: &str) -> PemFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.try_into().unwrap()));
        self.issue(file, params)
    }
}

/// An HTTP/1.1-over-TLS client to `127.0.0.1` trusting `ca` and presenting `identity` (if any).
/// (Hand-made on hyper: turning on reqwest's TLS would make every plain `reqwest::Client` of the
/// workspace's tests need a process-wide crypto provider.)
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// A client trusting `ca`, presenting `identity`.
    pub fn new(ca: &Path, identity: Option<&PemFiles>) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(files) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                builder
                    .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&files.key).unwrap())
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsClient {
            config: Arc::new(config),
        }
    }

    /// `method path` on `127.0.0.1:port` with `headers` and a JSON `body`: the status and the
    /// body as JSON (`null` when it is not); `Err` when the connection or handshake fails.
    pub async fn send(
        &self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        use http_body_util::{BodyExt, Full};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "idempotency-store");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let bytes = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                bytes::Bytes::from(json.to_string())
            }
            None => bytes::Bytes::new(),
        };
        let response = sender
            .send_request(request.body(Full::new(bytes)).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        ))
    }
}
