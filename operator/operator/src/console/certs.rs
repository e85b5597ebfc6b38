//! covi's console CA and the certificates it issues. The CA lives in a Secret in the
//! operator's namespace, created by the first replica that finds none; every replica
//! issues its own serving and client certificates from it at start, in memory; the
//! agents' shared serving certificate is kept in a second Secret and issued again when
//! it nears its end or the CA changed. The APIService's caBundle is the CA, so the API
//! server trusts any replica's serving certificate.

use std::collections::BTreeMap;

use covi_api::console::{AGENT_SECRET, AGENT_SERVER_NAME, API_SERVICE, CA_SECRET, OPERATOR_CLIENT_NAME};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::ConsoleError;

/// The CA is valid this long; a new one means new agent certificates too.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Serving and client certificates.
const LEAF_VALIDITY: Duration = Duration::days(365);
/// The agents' certificate is issued again when less than this is left.
const RENEW_BEFORE: Duration = Duration::days(90);

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A new self-signed CA.
pub fn new_ca() -> Result<Pem, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "covi-console-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A TLS server under this DNS name.
    Server,
    /// A TLS client with this common name.
    Client,
}

/// A certificate for `name` signed by `ca`.
pub fn issue(ca: &Pem, name: &str, purpose: Purpose) -> Result<Pem, rcgen::Error> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, KeyPair::from_pem(&ca.key)?)?;
    let key = KeyPair::generate()?;
    let mut params = match purpose {
        Purpose::Server => CertificateParams::new(vec![name.to_string()])?,
        Purpose::Client => CertificateParams::default(),
    };
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![match purpose {
        Purpose::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Purpose::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    validity(&mut params, LEAF_VALIDITY);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

fn validity(params: &mut CertificateParams, valid: Duration) {
    let now = OffsetDateTime::now_utc();
    // An hour back: clocks across hosts differ a little.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + valid;
}

/// Whether `cert` (PEM) ends within [`RENEW_BEFORE`] or cannot be read.
pub fn due_for_renewal(cert: &str) -> bool {
    let Ok(certs) = covi_daemon::tls::certificates(cert, "certificate") else { return true };
    let Some(end) = certs.first().and_then(covi_daemon::tls::not_after) else { return true };
    end < (OffsetDateTime::now_utc() + RENEW_BEFORE).unix_timestamp()
}

/// The operator replica's console certificates.
#[derive(Clone, Debug)]
pub struct Certificates {
    pub ca: String,
    /// Towards the API server, as `<service>.<namespace>.svc`.
    pub serving: Pem,
    /// Towards agents.
    pub client: Pem,
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

fn secret(name: &str, data: BTreeMap<&str, &str>) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "covi".to_string())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data.into_iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()),
        ..Default::default()
    }
}

fn failed(what: &str) -> impl Fn(kube::Error) -> ConsoleError + '_ {
    move |source| ConsoleError::Kube { what: what.to_string(), source }
}

/// The CA from its Secret, creating both when there is none (a replica that loses the
/// race to create it reads the winner's).
async fn ca(secrets: &Api<Secret>) -> Result<Pem, ConsoleError> {
    for _ in 0..3 {
        if let Some(s) = secrets.get_opt(CA_SECRET).await.map_err(failed("reading the console CA Secret"))? {
            return match (text(&s, "tls.crt"), text(&s, "tls.key")) {
                (Some(cert), Some(key)) => Ok(Pem { cert, key }),
                _ => Err(ConsoleError::Certificates(format!(
                    "Secret {CA_SECRET} lacks tls.crt or tls.key; delete it and the operator makes a new CA"
                ))),
            };
        }
        let pem = new_ca().map_err(|e| ConsoleError::Certificates(format!("making the console CA: {e}")))?;
        let created = secret(CA_SECRET, [("tls.crt", pem.cert.as_str()), ("tls.key", pem.key.as_str())].into());
        match secrets.create(&PostParams::default(), &created).await {
            Ok(_) => {
                tracing::info!(secret = CA_SECRET, "created covi's console CA");
                return Ok(pem);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(failed("creating the console CA Secret")(e)),
        }
    }
    Err(ConsoleError::Certificates(format!("Secret {CA_SECRET} keeps appearing and vanishing")))
}

/// Makes sure the CA, the agents' Secret and the APIService's caBundle are in place,
/// and issues this replica's certificates.
pub async fn ensure(client: &Client, namespace: &str, service: &str) -> Result<Certificates, ConsoleError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = ca(&secrets).await?;
    let issue_failed = |e: rcgen::Error| ConsoleError::Certificates(format!("issuing a console certificate: {e}"));

    let agent = secrets.get_opt(AGENT_SECRET).await.map_err(failed("reading the agents' console Secret"))?;
    let current = agent.as_ref().and_then(|s| Some((text(s, "ca.crt")?, text(s, "tls.crt")?)));
    let fresh = current.is_some_and(|(agent_ca, cert)| agent_ca == ca.cert && !due_for_renewal(&cert));
    if !fresh {
        let pem = issue(&ca, AGENT_SERVER_NAME, Purpose::Server).map_err(issue_failed)?;
        let data = [("ca.crt", ca.cert.as_str()), ("tls.crt", pem.cert.as_str()), ("tls.key", pem.key.as_str())];
        let mut object = secret(AGENT_SECRET, data.into());
        let result = match agent {
            Some(old) => {
                object.metadata.resource_version = old.resource_version();
                secrets.replace(AGENT_SECRET, &PostParams::default(), &object).await
            }
            None => secrets.create(&PostParams::default(), &object).await,
        };
        match result {
            Ok(_) => tracing::info!(secret = AGENT_SECRET, "issued the agents' console certificate"),
            // Another replica did it at the same moment: theirs serves as well.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(failed("writing the agents' console Secret")(e)),
        }
    }

    ca_bundle(client, &ca.cert).await?;
    let serving = issue(&ca, &format!("{service}.{namespace}.svc"), Purpose::Server).map_err(issue_failed)?;
    let client_cert = issue(&ca, OPERATOR_CLIENT_NAME, Purpose::Client).map_err(issue_failed)?;
    Ok(Certificates { ca: ca.cert, serving, client: client_cert })
}

/// Puts the CA into the APIService's caBundle when it is not there yet. The APIService
/// itself is installed with the chart; without it no console request arrives.
async fn ca_bundle(client: &Client, ca: &str) -> Result<(), ConsoleError> {
    let api: Api<APIService> = Api::all(client.clone());
    let Some(current) = api.get_opt(API_SERVICE).await.map_err(failed("reading the console's APIService"))? else {
        tracing::warn!(
            apiservice = API_SERVICE,
            "the APIService is missing: `kubectl covi console` cannot reach covi until it is installed"
        );
        return Ok(());
    };
    if current.spec.as_ref().and_then(|s| s.ca_bundle.as_ref()).is_some_and(|b| b.0 == ca.as_bytes()) {
        return Ok(());
    }
    let patch = serde_json::json!({"spec": {"caBundle": ByteString(ca.as_bytes().to_vec())}});
    api.patch(API_SERVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(failed("writing the console APIService's caBundle"))?;
    tracing::info!(apiservice = API_SERVICE, "set the console APIService's caBundle");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use covi_daemon::tls::tokio_rustls::{TlsAcceptor, TlsConnector};
    use covi_daemon::tls::{Identity, client, server};
    use rustls_pki_types::ServerName;

    /// A TLS handshake between a client presenting `client_pem` and a server presenting
    /// `server_pem` that accepts clients of `client_ca`; the client trusts `server_ca`.
    async fn handshake(server_pem: &Pem, client_ca: &str, client_pem: &Pem, server_ca: &str) -> Result<(), String> {
        let server = server(Identity::from_pem(&server_pem.cert, &server_pem.key, "server").unwrap(), client_ca, "ca")
            .map_err(|e| e.to_string())?;
        let client = client(Identity::from_pem(&client_pem.cert, &client_pem.key, "client").unwrap(), server_ca, "ca")
            .map_err(|e| e.to_string())?;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut tls = TlsAcceptor::from(server).accept(a).await.map_err(|e| e.to_string())?;
            // TLS 1.3 checks the client's certificate after the client's handshake ends:
            // a read is where the server's verdict shows.
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        });
        let name = ServerName::try_from(AGENT_SERVER_NAME).unwrap();
        let mut connected = TlsConnector::from(client).connect(name, b).await;
        if let Ok(tls) = &mut connected {
            use tokio::io::AsyncWriteExt;
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
        }
        // The client stays connected until the server has its verdict.
        let verdict = accept.await.unwrap();
        drop(connected);
        verdict
    }

    #[tokio::test]
    async fn only_the_operator_reaches_an_agent_and_only_a_covi_agent_is_trusted() {
        let ca = new_ca().unwrap();
        let agent = issue(&ca, AGENT_SERVER_NAME, Purpose::Server).unwrap();
        let operator = issue(&ca, OPERATOR_CLIENT_NAME, Purpose::Client).unwrap();
        handshake(&agent, &ca.cert, &operator, &ca.cert).await.expect("the operator reaches the agent");

        // The agents' certificate is for serving only: one agent cannot pose as the
        // operator towards another.
        let posing = handshake(&agent, &ca.cert, &agent, &ca.cert).await;
        assert!(posing.is_err(), "a server certificate used as a client is refused");
        // A certificate of another CA is refused either way.
        let other = new_ca().unwrap();
        let stranger = issue(&other, OPERATOR_CLIENT_NAME, Purpose::Client).unwrap();
        assert!(handshake(&agent, &ca.cert, &stranger, &ca.cert).await.is_err(), "a stranger's client certificate");
        let impostor = issue(&other, AGENT_SERVER_NAME, Purpose::Server).unwrap();
        assert!(handshake(&impostor, &ca.cert, &operator, &ca.cert).await.is_err(), "an impostor agent");
        assert_eq!(
            covi_daemon::tls::common_name(&covi_daemon::tls::certificates(&operator.cert, "c").unwrap()[0]).as_deref(),
            Some(OPERATOR_CLIENT_NAME)
        );
    }

    #[test]
    fn certificates_are_renewed_before_they_end() {
        let ca = new_ca().unwrap();
        let fresh = issue(&ca, AGENT_SERVER_NAME, Purpose::Server).unwrap();
        assert!(!due_for_renewal(&fresh.cert), "a year left");
        assert!(due_for_renewal("not a certificate"), "unreadable: issue a new one");
    }
}
