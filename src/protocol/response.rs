//! Encoding answers for the client, framed and ready to write.

use ssh_agent_lib::proto::Response;
use ssh_encoding::Encode;

/// SSH_AGENT_FAILURE, framed.
pub const FAILURE: [u8; 5] = [0, 0, 0, 1, 5];
/// SSH_AGENT_SUCCESS, framed.
pub const SUCCESS: [u8; 5] = [0, 0, 0, 1, 6];

/// Frames a response. An answer that cannot be encoded (which would be a bug,
/// or an upstream answer too large to relay) becomes FAILURE.
pub fn encode(response: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    let ok = response
        .encoded_len()
        .ok()
        .filter(|&n| n <= super::MAX_MESSAGE_LEN)
        .and_then(|n| u32::try_from(n).ok())
        .is_some_and(|n| n.encode(&mut out).is_ok() && response.encode(&mut out).is_ok());
    if ok {
        out
    } else {
        FAILURE.to_vec()
    }
}

/// SSH_AGENT_SIGN_RESPONSE
pub const SIGN_RESPONSE: u8 = 14;

/// Frames a SIGN_RESPONSE around `signature`, the `string signature` exactly
/// as the backend produced it (never decoded: `ssh-rsa` SHA-1 included).
/// FAILURE if it would exceed the cap.
pub fn sign_response(signature: &[u8]) -> Vec<u8> {
    let Some((len, inner)) = signature
        .len()
        .checked_add(5)
        .filter(|&n| n <= super::MAX_MESSAGE_LEN)
        .and_then(|n| Some((u32::try_from(n).ok()?, u32::try_from(signature.len()).ok()?)))
    else {
        return FAILURE.to_vec();
    };
    let mut out = Vec::with_capacity(signature.len() + 9);
    out.extend(len.to_be_bytes());
    out.push(SIGN_RESPONSE);
    out.extend(inner.to_be_bytes());
    out.extend(signature);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_and_success_frames() {
        assert_eq!(encode(&Response::Failure), FAILURE);
        assert_eq!(encode(&Response::Success), SUCCESS);
        assert_eq!(
            encode(&Response::IdentitiesAnswer(vec![])),
            [0, 0, 0, 5, 12, 0, 0, 0, 0]
        );
    }

    #[test]
    fn sign_response_relays_the_blob() {
        assert_eq!(
            sign_response(b"ab"),
            [0, 0, 0, 7, 14, 0, 0, 0, 2, b'a', b'b']
        );
        assert_eq!(
            sign_response(&vec![0; super::super::MAX_MESSAGE_LEN]),
            FAILURE
        );
        let fits = super::super::MAX_MESSAGE_LEN - 5;
        assert_eq!(
            sign_response(&vec![0; fits]).len(),
            4 + super::super::MAX_MESSAGE_LEN
        );
    }
}
