//! MQTT packets written byte by byte, for tests that must send what a well-behaved
//! client library never would (hostile wills, huge topics, half a CONNECT), and a reader
//! for whatever the broker answers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

/// MQTT's variable-length "remaining length".
pub fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
pub fn string(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// A last will: topic, payload, retained or not (QoS 1).
#[derive(Debug, Clone)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub retain: bool,
}

/// A CONNECT (clean session unless `keep_session`, keep-alive 60 s), MQTT 3.1.1 or 5.
#[derive(Debug, Clone, Default)]
pub struct Connect<'a> {
    pub v5: bool,
    pub client_id: &'a str,
    pub login: Option<(&'a str, &'a str)>,
    pub will: Option<Will<'a>>,
    /// Clean session (3.1.1) / clean start (5) off.
    pub keep_session: bool,
    /// MQTT 5 CONNECT properties, encoded (see [`property_u32`]).
    pub properties: Vec<u8>,
    /// Keep-alive in seconds; `None` for 60.
    pub keep_alive: Option<u16>,
}

/// An MQTT 5 property with a four-byte value (0x11 session expiry, 0x27 maximum packet size).
pub fn property_u32(id: u8, value: u32) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(value.to_be_bytes());
    out
}

/// An MQTT 5 property with a two-byte value (0x23 topic alias, 0x21 receive maximum).
pub fn property_u16(id: u8, value: u16) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(value.to_be_bytes());
    out
}

/// Parsed MQTT 5 properties: each id with its value's bytes.
pub type Properties = Vec<(u8, Vec<u8>)>;

/// MQTT 5 properties read back from `bytes` (starting at their length): each id with its
/// value's bytes (without a length prefix for strings and binary data), or `None` if
/// they do not parse. Returns the bytes after the properties too.
pub fn parse_properties(bytes: &[u8]) -> Option<(Properties, &[u8])> {
    let (mut len, mut at, mut shift) = (0usize, 0usize, 0);
    loop {
        let byte = *bytes.get(at)?;
        at += 1;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let (mut props, rest) = (bytes.get(at..at + len)?, bytes.get(at + len..)?);
    let mut out = Vec::new();
    while let Some((&id, tail)) = props.split_first() {
        let fixed = |n: usize| tail.get(..n).map(|v| (v.to_vec(), n));
        let prefixed = |from: usize| {
            let n = usize::from(u16::from_be_bytes([*tail.get(from)?, *tail.get(from + 1)?]));
            Some((tail.get(from + 2..from + 2 + n)?.to_vec(), from + 2 + n))
        };
        let (value, used) = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => fixed(1)?,
            0x13 | 0x21 | 0x22 | 0x23 => fixed(2)?,
            0x02 | 0x11 | 0x18 | 0x27 => fixed(4)?,
            0x0b => {
                let n = tail.iter().position(|b| b & 0x80 == 0)? + 1;
                fixed(n)?
            }
            // A user property: name and value, kept with their length prefixes.
            0x26 => {
                let (_, after_name) = prefixed(0)?;
                let (_, after_value) = prefixed(after_name)?;
                (tail.get(..after_value)?.to_vec(), after_value)
            }
            _ => prefixed(0)?,
        };
        out.push((id, value));
        props = tail.get(used..)?;
    }
    Some((out, rest))
}

/// A two-byte property's value (0x13 server keep alive, 0x22 topic alias maximum, 0x23
/// topic alias) in parsed properties.
pub fn find_u16(properties: &[(u8, Vec<u8>)], id: u8) -> Option<u16> {
    properties
        .iter()
        .find(|(found, _)| *found == id)
        .and_then(|(_, value)| Some(u16::from_be_bytes([*value.first()?, *value.get(1)?])))
}

/// Properties as they go into a packet: their length first.
fn with_length(properties: &[u8]) -> Vec<u8> {
    let mut out = remaining_length(properties.len());
    out.extend_from_slice(properties);
    out
}

/// An MQTT 5 PUBLISH (packet id 1 for QoS 1 and 2) with properties.
pub fn publish_v5(topic: &[u8], payload: &[u8], qos: u8, properties: &[u8]) -> Vec<u8> {
    publish_v5_id(topic, payload, qos, 1, properties)
}

/// An MQTT 5 PUBLISH with its own packet id (ignored at QoS 0) and properties.
pub fn publish_v5_id(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    packet_id: u16,
    properties: &[u8],
) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend(packet_id.to_be_bytes());
    }
    body.extend(with_length(properties));
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 PUBLISH read back from its first byte and body.
#[derive(Debug)]
pub struct Delivered<'a> {
    pub topic: &'a [u8],
    pub packet_id: Option<u16>,
    pub properties: Properties,
    pub payload: &'a [u8],
}

/// The parts of an MQTT 5 PUBLISH, or `None` if it does not parse.
pub fn parse_publish_v5(first_byte: u8, body: &[u8]) -> Option<Delivered<'_>> {
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = body.get(2..2 + topic_len)?;
    let mut rest = body.get(2 + topic_len..)?;
    let mut packet_id = None;
    if first_byte & 0x06 != 0 {
        packet_id = Some(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        rest = rest.get(2..)?;
    }
    let (properties, payload) = parse_properties(rest)?;
    Some(Delivered {
        topic,
        packet_id,
        properties,
        payload,
    })
}

/// An MQTT 5 SUBSCRIBE for one filter at `qos`.
pub fn subscribe_v5(packet_id: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0);
    body.extend(string(filter));
    body.push(qos);
    packet(0x82, &body)
}

/// An MQTT 5 DISCONNECT, normal, with properties.
pub fn disconnect_v5(properties: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend(with_length(properties));
    packet(0xe0, &body)
}

impl Connect<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = if self.keep_session { 0 } else { 0x02 };
        if self.login.is_some() {
            flags |= 0xC0;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (1 << 3) | if will.retain { 0x20 } else { 0 };
        }
        let mut body = string(b"MQTT");
        body.extend([if self.v5 { 5 } else { 4 }, flags]);
        body.extend(self.keep_alive.unwrap_or(60).to_be_bytes());
        if self.v5 {
            body.extend(with_length(&self.properties));
        }
        body.extend(string(self.client_id.as_bytes()));
        if let Some(will) = &self.will {
            if self.v5 {
                body.push(0); // no will properties
            }
            body.extend(string(will.topic.as_bytes()));
            body.extend(string(will.payload));
        }
        if let Some((user, password)) = self.login {
            body.extend(string(user.as_bytes()));
            body.extend(string(password.as_bytes()));
        }
        packet(0x10, &body)
    }
}

/// An MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, optional username and password.
pub fn connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    Connect {
        client_id,
        login,
        ..Connect::default()
    }
    .encode()
}

/// A QoS 0 PUBLISH (MQTT 3.1.1).
pub fn publish(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// A QoS 1 PUBLISH with packet id 1, retained or not; `v5` adds the empty property list.
pub fn publish_qos1(topic: &[u8], payload: &[u8], retain: bool, v5: bool) -> Vec<u8> {
    let mut body = string(topic);
    body.extend([0, 1]);
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x32 | u8::from(retain), &body)
}

/// A SUBSCRIBE for one filter at QoS 0 (MQTT 3.1.1).
pub fn subscribe(packet_id: u16, filter: &[u8]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend(string(filter));
    body.push(0);
    packet(0x82, &body)
}

/// One packet from the broker: its first byte and body, or `None` when the connection
/// closed (or nothing came within `within`).
pub async fn read_packet(stream: &mut TcpStream, within: Duration) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(within, async {
        let first = stream.read_u8().await.ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let byte = stream.read_u8().await.ok()?;
            len |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        }
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await.ok()?;
        Some((first, body))
    })
    .await
    .ok()
    .flatten()
}

/// Sends `connect` on a new connection and returns it with the CONNACK's return code
/// (3.1.1) or reason code (5): 0 is success.
pub async fn connect_with(addr: SocketAddr, connect: &Connect<'_>) -> (TcpStream, u8) {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
    stream
        .write_all(&connect.encode())
        .await
        .expect("CONNECT sent");
    let (first, body) = read_packet(&mut stream, WAIT)
        .await
        .expect("a CONNACK in time");
    assert_eq!(first, 0x20, "CONNACK expected, got {first:#x}");
    let code = *body.get(1).expect("a CONNACK code");
    (stream, code)
}

/// Whether the broker closes `stream` within `within` (reading and dropping whatever it
/// sends until then).
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
