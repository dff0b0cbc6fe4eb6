//! What the engines' TLS clients share: why a database server's certificate
//! was turned down, said so that a user can act on it.

use std::io;

/// Why rustls rejected the database's certificate, without the host names
/// that rustls's own text carries (the expected and the presented ones);
/// `None` for any other error.
pub fn rejection(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else {
        return None;
    };
    let why = match c {
        C::UnknownIssuer => {
            "is not signed by an authority Weir trusts: set the source's tls_ca_file to the authority's certificate"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => "is not valid for the source's host",
        C::Expired | C::ExpiredContext { .. } => "has expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "is not valid yet (are the clocks right?)",
        _ => "was rejected",
    };
    Some(format!("the database's TLS certificate {why}"))
}

/// The rustls error a failed handshake left inside an I/O error.
pub fn in_io(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}
