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
}
