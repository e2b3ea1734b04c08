//! The CA directory on disk and the credentials issued from it: which files
//! exist, how they are written (keys with mode 0600, never silently
//! overwritten), and the two operations on them, `ca init` and `ca issue`.
//!
//! A CA directory holds `root-cert.pem` and `root-key.pem`, plus
//! `intermediate-cert.pem` and `intermediate-key.pem` when created with an
//! intermediate (which then signs every workload certificate). An issue
//! directory holds `cert.pem` (the chain, leaf first), `key.pem` and
//! `bundle.pem` (the root to trust).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use infermesh_certs::{
    CaError, CaOptions, CertificateAuthority, SpiffeId, TrustDomain, WorkloadError, WorkloadKey,
};

/// Root CA certificate file name.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Root CA private key file name.
pub const ROOT_KEY: &str = "root-key.pem";
/// Intermediate CA certificate file name.
pub const INTERMEDIATE_CERT: &str = "intermediate-cert.pem";
/// Intermediate CA private key file name.
pub const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
/// Workload certificate chain file name.
pub const CERT: &str = "cert.pem";
/// Workload private key file name.
pub const KEY: &str = "key.pem";
/// Trust bundle (root certificates) file name.
pub const BUNDLE: &str = "bundle.pem";

/// Why `ca init` or `ca issue` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaFilesError {
    /// Output files exist and `force` was not given.
    #[error("refusing to overwrite {}; pass --force to replace them", list(.0))]
    Exists(Vec<PathBuf>),
    /// The CA directory lacks its root files.
    #[error(
        "{0} not found; create a CA with `infermesh-control-plane ca init --trust-domain <td> --out <dir>` or point --ca at one"
    )]
    MissingCa(PathBuf),
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}; check the path and its permissions")]
    Io {
        /// `read`, `write`, ...
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA refused or failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Key or CSR generation failed.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// A file is not what the command needs.
    #[error("{path}: {reason}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `ca init` should create.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// The trust domain the CA signs for.
    pub trust_domain: TrustDomain,
    /// Directory to write into (created if missing).
    pub out: PathBuf,
    /// Validity of the root (and of the intermediate, clamped to the root's).
    pub validity: Duration,
    /// Also create an intermediate CA that signs workload certificates.
    pub intermediate: bool,
    /// Replace existing files.
    pub force: bool,
    /// When `out` already holds a CA for the same trust domain, keep it
    /// and write nothing (for a start script run on every start).
    pub keep_existing: bool,
}

/// What `ca init` did.
#[derive(Debug)]
pub enum Initialized {
    /// A new CA, in these files.
    Created(Vec<WrittenFile>),
    /// The directory already held a CA for the trust domain, kept as it
    /// was; it expires then.
    Kept {
        /// When the kept CA's certificate expires.
        not_after: std::time::SystemTime,
    },
}

/// What `ca issue` should create.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// A directory written by `ca init`.
    pub ca_dir: PathBuf,
    /// The identity to certify.
    pub identity: SpiffeId,
    /// Directory to write into (created if missing).
    pub out: PathBuf,
    /// Certificate lifetime.
    pub ttl: Duration,
    /// Replace existing files.
    pub force: bool,
}

/// One file written, for the CLI to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Where.
    pub path: PathBuf,
    /// What it holds, in words.
    pub description: String,
}

/// Creates a root CA (and optionally an intermediate) in `request.out`.
/// Refuses, writing nothing, if any of the files exists and `force` is off
/// (with `keep_existing`, a whole CA of the same trust domain is kept).
pub fn init(request: &InitRequest) -> Result<Initialized, CaFilesError> {
    if request.keep_existing && !request.force && request.out.join(ROOT_CERT).exists() {
        let ca = load_ca(&request.out)?;
        if ca.trust_domain() != &request.trust_domain {
            return Err(CaFilesError::Invalid {
                path: request.out.join(ROOT_CERT),
                reason: format!(
                    "it is the CA of {}, not of {}",
                    ca.trust_domain(),
                    request.trust_domain
                ),
            });
        }
        return Ok(Initialized::Kept {
            not_after: ca.not_after(),
        });
    }
    create(request).map(Initialized::Created)
}

/// Writes the trust bundle of the CA in `ca_dir` (its root certificate) to
/// `out`: the file proxies are given as `--trust-bundle`.
pub fn bundle(ca_dir: &Path, out: &Path, force: bool) -> Result<Vec<WrittenFile>, CaFilesError> {
    let ca = load_ca(ca_dir)?;
    let (dir, name) = match (out.parent(), out.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(CaFilesError::Invalid {
                path: out.to_owned(),
                reason: "not a file path".to_owned(),
            });
        }
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy().into_owned();
    let paths = check_targets(dir, &[name.as_str()], force)?;
    create_dir(dir)?;
    write_file(&paths[0], &ca.root_pem(), false)?;
    Ok(vec![WrittenFile {
        path: paths[0].clone(),
        description: format!("trust bundle: the root CA of {}", ca.trust_domain()),
    }])
}

fn create(request: &InitRequest) -> Result<Vec<WrittenFile>, CaFilesError> {
    let mut names = vec![ROOT_CERT, ROOT_KEY];
    if request.intermediate {
        names.extend([INTERMEDIATE_CERT, INTERMEDIATE_KEY]);
    }
    let paths = check_targets(&request.out, &names, request.force)?;

    let options = CaOptions {
        validity: request.validity,
        ..CaOptions::default()
    };
    let root = CertificateAuthority::new_root(&request.trust_domain, &options)?;
    let until = humantime::format_rfc3339_seconds(root.not_after());
    let td = &request.trust_domain;
    let mut files = vec![
        (
            root.certificate_pem(),
            false,
            format!("root CA certificate for {td}, valid until {until}"),
        ),
        (root.key_pem(), true, "root CA private key".to_owned()),
    ];
    if request.intermediate {
        let intermediate = root.new_intermediate(&options)?;
        let until = humantime::format_rfc3339_seconds(intermediate.not_after());
        files.push((
            intermediate.certificate_pem(),
            false,
            format!("intermediate CA certificate for {td}, valid until {until}"),
        ));
        files.push((
            intermediate.key_pem(),
            true,
            "intermediate CA private key".to_owned(),
        ));
    }
    create_dir(&request.out)?;
    paths
        .into_iter()
        .zip(files)
        .map(|(path, (contents, secret, description))| {
            write_file(&path, &contents, secret)?;
            Ok(WrittenFile { path, description })
        })
        .collect()
}

/// Issues a key and certificate for `request.identity` from the CA in
/// `request.ca_dir` (its intermediate if it has one), writing `cert.pem`,
/// `key.pem` and `bundle.pem`. Refuses, writing nothing, if any of them
/// exists and `force` is off.
pub fn issue(request: &IssueRequest) -> Result<Vec<WrittenFile>, CaFilesError> {
    let paths = check_targets(&request.out, &[CERT, KEY, BUNDLE], request.force)?;
    let ca = load_ca(&request.ca_dir)?;

    let key = WorkloadKey::generate()?;
    let csr = key.csr(&request.identity)?;
    let issued = ca.sign_csr(csr.der(), &request.identity, request.ttl)?;
    let until = humantime::format_rfc3339_seconds(issued.not_after());
    let files = [
        (
            issued.chain_pem().to_owned(),
            false,
            format!(
                "certificate chain for {}, valid until {until}",
                request.identity
            ),
        ),
        (key.private_key_pem(), true, "private key".to_owned()),
        (
            ca.root_pem(),
            false,
            format!("trust bundle: the root CA of {}", ca.trust_domain()),
        ),
    ];
    create_dir(&request.out)?;
    paths
        .into_iter()
        .zip(files)
        .map(|(path, (contents, secret, description))| {
            write_file(&path, &contents, secret)?;
            Ok(WrittenFile { path, description })
        })
        .collect()
}

/// Loads the signing CA from a `ca init` directory: the intermediate when
/// present, otherwise the root.
pub fn load_ca(dir: &Path) -> Result<CertificateAuthority, CaFilesError> {
    let root_cert = read(&dir.join(ROOT_CERT))?;
    let intermediate_cert = dir.join(INTERMEDIATE_CERT);
    let ca = if intermediate_cert.exists() {
        let chain = read(&intermediate_cert)? + &root_cert;
        CertificateAuthority::from_pem(&chain, &read(&dir.join(INTERMEDIATE_KEY))?)?
    } else {
        CertificateAuthority::from_pem(&root_cert, &read(&dir.join(ROOT_KEY))?)?
    };
    Ok(ca)
}

fn read(path: &Path) -> Result<String, CaFilesError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CaFilesError::MissingCa(path.to_owned())
        } else {
            CaFilesError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// The output paths, or the list of those that exist when not forcing.
fn check_targets(dir: &Path, names: &[&str], force: bool) -> Result<Vec<PathBuf>, CaFilesError> {
    let paths: Vec<PathBuf> = names.iter().map(|name| dir.join(name)).collect();
    if !force {
        let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
        if !existing.is_empty() {
            return Err(CaFilesError::Exists(existing));
        }
    }
    Ok(paths)
}

fn create_dir(dir: &Path) -> Result<(), CaFilesError> {
    std::fs::create_dir_all(dir).map_err(|source| CaFilesError::Io {
        action: "create directory",
        path: dir.to_owned(),
        source,
    })
}

/// Writes through a temporary file in the same directory and renames it into
/// place, so a reader never sees half a file; secret files are created with
/// mode 0600 from the start.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CaFilesError> {
    let io_error = |action, source| CaFilesError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(|e| io_error("create", e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io_error("replace", e))
}
