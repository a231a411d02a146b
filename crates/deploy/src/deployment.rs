//! What a deployment is, as the registry's recovery info records it: the
//! context's name, the replica count, the container registry's URL, the image reference
//! and its manifest digest. `br2k deploy` writes it; the manager reads it back to redeploy
//! the same image by digest. Never a credential: a context *name*, a registry *URL*.

use alloy::primitives::{Address, B256};
use br2k_bindings::IServiceRegistry::Body;
use br2k_resolver::RegistryClient;

use crate::error::{DeployError, Result};

/// An image in a container registry, pinned by its manifest digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedImage {
    /// The registry's base URL (`https://host[:port]`, or `http://` for a plain-HTTP one).
    pub registry_url: String,
    /// The repository in it, e.g. `br2k/logserver`.
    pub repository: String,
    /// The tag it was pushed with (informative: the digest is what is deployed); empty
    /// when it was named by digest only.
    pub tag: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

impl PinnedImage {
    /// `host[:port]/repository@sha256:...`, as a container runtime pulls it.
    pub fn pull_reference(&self) -> String {
        let host = self.registry_url.split("://").nth(1).unwrap_or(&self.registry_url).trim_end_matches('/');
        format!("{host}/{}@{}", self.repository, self.digest)
    }

    /// The digest as the 32 bytes the registry stores.
    ///
    /// # Errors
    /// A digest that is not `sha256:` and 64 hex digits.
    pub fn digest_bytes(&self) -> Result<B256> {
        self.digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64)
            .and_then(|hex| hex.parse::<B256>().ok())
            .ok_or_else(|| DeployError::Invalid(format!("{:?} is not a sha256 digest", self.digest)))
    }
}

/// A deployment as recorded on chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentRecord {
    /// The context's name (`local`, or a Kubernetes context).
    pub context: String,
    /// How many replicas.
    pub replicas: u32,
    /// The image the replicas run.
    pub image: PinnedImage,
}

impl DeploymentRecord {
    /// The registry's recovery info for this deployment, made by `deployer`.
    ///
    /// # Errors
    /// A malformed digest.
    pub fn to_body(&self, deployer: Address) -> Result<Body> {
        Ok(Body {
            deployer,
            context: self.context.clone(),
            replicas: self.replicas,
            containerRegistry: self.image.registry_url.clone(),
            image: if self.image.tag.is_empty() {
                format!("{}@{}", self.image.repository, self.image.digest)
            } else {
                format!("{}:{}", self.image.repository, self.image.tag)
            },
            imageDigest: self.image.digest_bytes()?,
        })
    }

    /// Reads a deployment back from recovery info.
    ///
    /// # Errors
    /// Recovery info that names no container registry, image or digest (a service
    /// registered by hand and never deployed with `br2k deploy`).
    pub fn from_body(body: &Body) -> Result<Self> {
        if body.containerRegistry.is_empty() || body.image.is_empty() || body.imageDigest == B256::ZERO {
            return Err(DeployError::Invalid(
                "the recovery info names no container registry, image and digest: deploy the service once with `br2k deploy NAME --image ...`"
                    .into(),
            ));
        }
        let (repository, tag) = match body.image.split_once('@') {
            Some((repository, _)) => (repository, ""),
            None => body.image.rsplit_once(':').unwrap_or((&body.image, "latest")),
        };
        Ok(Self {
            context: body.context.clone(),
            replicas: body.replicas,
            image: PinnedImage {
                registry_url: body.containerRegistry.clone(),
                repository: repository.to_owned(),
                tag: tag.to_owned(),
                digest: format!("sha256:{}", alloy::hex::encode(body.imageDigest)),
            },
        })
    }
}

/// What [`record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The service was not registered; it now is, with this recovery info.
    Registered,
    /// The recovery info was replaced.
    Updated,
    /// It already said exactly this; no transaction was sent.
    Unchanged,
}

/// Records `deployment` as the recovery info of `service`, registering the service when it
/// is not (the signing key becomes its manager). Called before the replicas are started:
/// the recovery info says what *should* run, so a deployment that fails half-way can still
/// be recovered to it.
///
/// # Errors
/// A service managed by another key, or a chain error.
pub async fn record(
    registry: &RegistryClient,
    service: &str,
    deployment: &DeploymentRecord,
    manager: Address,
) -> Result<Recorded> {
    let body = deployment.to_body(manager)?;
    match registry.info(service).await {
        Ok(info) if info.manager != manager => Err(DeployError::Invalid(format!(
            "service {service:?} is managed by {}, not by this key ({manager}): deploy it with its manager's key",
            info.manager
        ))),
        Ok(info) if info.recovery == body => Ok(Recorded::Unchanged),
        Ok(_) => {
            registry.set_recovery_info(service, body).await?;
            Ok(Recorded::Updated)
        }
        Err(br2k_resolver::Error::UnknownService { .. }) => {
            registry.register(service, body).await?;
            Ok(Recorded::Registered)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DeploymentRecord {
        DeploymentRecord {
            context: "prod".into(),
            replicas: 3,
            image: PinnedImage {
                registry_url: "https://harbor.example.org".into(),
                repository: "br2k/logserver".into(),
                tag: "v1".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
            },
        }
    }

    #[test]
    fn recovery_info_round_trips() {
        let body = record().to_body(Address::repeat_byte(1)).unwrap();
        assert_eq!(body.image, "br2k/logserver:v1");
        assert_eq!(body.containerRegistry, "https://harbor.example.org");
        assert_eq!(DeploymentRecord::from_body(&body).unwrap(), record());
        let mut by_digest = record();
        by_digest.image.tag = String::new();
        let body = by_digest.to_body(Address::ZERO).unwrap();
        assert_eq!(body.image, format!("br2k/logserver@sha256:{}", "ab".repeat(32)));
        assert_eq!(DeploymentRecord::from_body(&body).unwrap(), by_digest);
        assert_eq!(
            record().image.pull_reference(),
            format!("harbor.example.org/br2k/logserver@sha256:{}", "ab".repeat(32))
        );
    }

    #[test]
    fn empty_or_malformed_recovery_info_is_refused_with_what_to_do() {
        let mut body = record().to_body(Address::ZERO).unwrap();
        body.imageDigest = B256::ZERO;
        assert!(DeploymentRecord::from_body(&body).unwrap_err().to_string().contains("br2k deploy"));
        let mut bad = record();
        bad.image.digest = "sha256:xyz".into();
        assert!(bad.to_body(Address::ZERO).unwrap_err().to_string().contains("not a sha256 digest"));
    }
}
