//! The server side of a SCRAM-SHA-256 exchange (RFC 5802, RFC 7677), as a
//! state machine without I/O: [`Exchange::start`] answers the client-first
//! message, [`Exchange::finish`] checks the client's proof against the
//! stored verifier and returns the server's signature.
//!
//! An unknown user gets a made-up verifier from a per-server secret, so the
//! exchange runs to its end and fails there exactly as a wrong password
//! does: nobody can learn which accounts exist.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::accounts::{SCRAM_ITERATIONS, Verifier, hmac};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// Reject: the client broke the protocol.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Reject: channel binding was asked for, but is not offered.
    #[error(
        "SCRAM channel binding is not supported; connect without it (e.g. channel_binding=disable)"
    )]
    ChannelBinding,
    /// Reject: wrong password or unknown user (deliberately one error).
    #[error("password authentication failed")]
    Failed,
}

/// After the server-first message: what the final step needs.
#[derive(Debug)]
pub struct Exchange {
    verifier: Verifier,
    /// False for an unknown user: the proof can never be right.
    known: bool,
    gs2_header: String,
    nonce: String,
    client_first_bare: String,
    server_first: String,
}

impl Exchange {
    /// Answers `client_first` (`n,,n=...,r=<client nonce>`) with the
    /// server-first message. `verifier` is `None` for an unknown user;
    /// `secret` then derives a stable salt for it.
    pub fn start(
        client_first: &str,
        verifier: Option<Verifier>,
        user: &str,
        secret: &[u8; 32],
        server_nonce: &[u8; 18],
    ) -> Result<(Exchange, String), ScramError> {
        let (gs2_header, bare) = split_gs2(client_first)?;
        // RFC 5802: a mandatory extension (`m=`) the server does not know
        // must fail the exchange.
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed(
                "client-first-message with a mandatory extension (m=), which is not supported",
            ));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed(
                "client-first-message without a nonce",
            ))?;
        let known = verifier.is_some();
        let verifier = verifier.unwrap_or_else(|| {
            // A salt an observer cannot tell from a real one, the same on
            // every attempt for this name.
            let salt = hmac(secret, user.as_bytes());
            Verifier {
                iterations: SCRAM_ITERATIONS,
                salt: salt[..16].to_vec(),
                stored_key: [0; 32],
                server_key: [0; 32],
            }
        });
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Exchange {
                verifier,
                known,
                gs2_header: gs2_header.to_owned(),
                nonce,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
            },
            server_first,
        ))
    }

    /// Checks `client_final` (`c=...,r=...,p=<proof>`); on success returns
    /// the server-final message (`v=<server signature>`).
    pub fn finish(self, client_final: &str) -> Result<String, ScramError> {
        let (without_proof, proof) =
            client_final
                .rsplit_once(",p=")
                .ok_or(ScramError::Malformed(
                    "client-final-message without a proof",
                ))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let binding = B64
            .decode(binding.ok_or(ScramError::Malformed("client-final-message without c="))?)
            .map_err(|_| ScramError::Malformed("c= is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::Malformed(
                "channel binding differs from the first message",
            ));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed(
                "the nonce differs from the one the server sent",
            ));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed(
                "the proof is not 32 base64-encoded bytes",
            ))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature))
        {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // Compare without an early exit, so timing says nothing.
        let differ = stored
            .iter()
            .zip(self.verifier.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differ != 0 || !self.known {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Splits the GS2 header (`n,,` or `y,,`, optionally with `a=authzid`)
/// from the client-first-message-bare.
fn split_gs2(client_first: &str) -> Result<(&str, &str), ScramError> {
    let mut parts = client_first.splitn(3, ',');
    let flag = parts.next().unwrap_or_default();
    let authz = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad GS2 channel-binding flag")),
    }
    if !authz.is_empty() && !authz.starts_with("a=") {
        return Err(ScramError::Malformed("bad GS2 authzid"));
    }
    let header_len = flag.len() + authz.len() + 2;
    Ok((&client_first[..header_len], bare))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: the whole SCRAM-SHA-256 example exchange.
    #[test]
    fn rfc_7677_example() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = Verifier::new("pencil", &salt, 4096);
        let client_first = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
        // The RFC's server nonce part, `%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0`, is
        // not base64 of bytes; build the exchange with it directly.
        let (mut ex, _) =
            Exchange::start(client_first, Some(verifier), "user", &[7; 32], &[0; 18]).unwrap();
        ex.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        ex.server_first = format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", ex.nonce);
        let final_msg = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            ex.finish(final_msg).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn wrong_proofs_unknown_users_and_bad_messages_fail() {
        let salt = [1u8; 16];
        let v = Verifier::new("right", &salt, 4096);
        let start = |v: Option<Verifier>| {
            Exchange::start("n,,n=,r=abc", v, "u", &[9; 32], &[3; 18]).unwrap()
        };
        let (ex, first) = start(Some(v.clone()));
        let nonce = first
            .split(',')
            .next()
            .unwrap()
            .trim_start_matches("r=")
            .to_owned();
        let bogus = format!("c=biws,r={nonce},p={}", B64.encode([0u8; 32]));
        assert_eq!(ex.finish(&bogus), Err(ScramError::Failed));
        let (ex, first_unknown) = start(None);
        assert!(first_unknown.contains(",i=4096"));
        let unknown_nonce = ex.nonce.clone();
        assert_eq!(
            ex.finish(&bogus.replace(&nonce, &unknown_nonce)),
            Err(ScramError::Failed)
        );
        let (ex, _) = start(Some(v.clone()));
        assert!(matches!(
            ex.finish("c=biws,r=other,p=AAAA"),
            Err(ScramError::Malformed(_))
        ));
        assert!(matches!(
            Exchange::start(
                "p=tls-server-end-point,,n=,r=x",
                Some(v.clone()),
                "u",
                &[0; 32],
                &[0; 18]
            ),
            Err(ScramError::ChannelBinding)
        ));
        assert!(matches!(
            Exchange::start("n,,m=ext,n=,r=x", Some(v.clone()), "u", &[0; 32], &[0; 18]),
            Err(ScramError::Malformed(_))
        ));
        assert!(matches!(
            Exchange::start("garbage", Some(v), "u", &[0; 32], &[0; 18]),
            Err(ScramError::Malformed(_))
        ));
    }
}
