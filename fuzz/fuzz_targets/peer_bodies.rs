//! The JSON bodies of the peer API, as a peer may send them (registration, status changes,
//! verification, token rotation, share redemption, and the answers a site reads back).
#![no_main]

use dbsync_protocol::peer::{
    ErrorBody, RedeemShareRequest, RedeemShareResponse, RegisterRequest, RegisterResponse,
    RotateTokenRequest, StatusResponse, UpdateStatusRequest, VerifyRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<RegisterRequest>(data);
    let _ = serde_json::from_slice::<RegisterResponse>(data);
    let _ = serde_json::from_slice::<UpdateStatusRequest>(data);
    let _ = serde_json::from_slice::<VerifyRequest>(data);
    let _ = serde_json::from_slice::<StatusResponse>(data);
    let _ = serde_json::from_slice::<ErrorBody>(data);
    let _ = serde_json::from_slice::<RotateTokenRequest>(data);
    let _ = serde_json::from_slice::<RedeemShareRequest>(data);
    let _ = serde_json::from_slice::<RedeemShareResponse>(data);
});
