from twisted.application.service import ServiceMaker

iwrelay = ServiceMaker(
    "iw-relay",
    "iw_relay.tap",
    "WebSocket relay for real-time collaborative editing",
    "iwrelay",
)
