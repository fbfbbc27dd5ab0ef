// QEMU's migration stream constants (docs/QEMU-SNAPSHOT.md): the native home
// of every one we read or write. lib/qemu-stream.ts is the TypeScript home;
// test/constants.test.ts compares the two constant by constant (through
// addon/constants.cc), so a constant goes into both or the test fails. Each
// group's prefix names its TypeScript table: kStream* Stream, kSection*
// Section, kFlag* RamFlag, kCmd* Command, kRp* ReturnPath.
#pragma once
#include <cstdint>

namespace uffdpc::qemu {

constexpr uint32_t kStreamMagic = 0x5145564d;  // "QEVM"
constexpr uint32_t kStreamVersion = 3;
constexpr uint32_t kStreamMaxPackaged = 1u << 24;  // the most one command package may hold

// Section (record) types (QEMU_VM_*).
constexpr uint8_t kSectionEof = 0x00;
constexpr uint8_t kSectionStart = 0x01;
constexpr uint8_t kSectionPart = 0x02;
constexpr uint8_t kSectionEnd = 0x03;
constexpr uint8_t kSectionFull = 0x04;
constexpr uint8_t kSectionVmDescription = 0x06;
constexpr uint8_t kSectionConfiguration = 0x07;
constexpr uint8_t kSectionCommand = 0x08;
constexpr uint8_t kSectionFooter = 0x7e;

// RAM record flags (RAM_SAVE_FLAG_*), in the low bits of each record's address.
constexpr uint64_t kFlagFull = 0x01;
constexpr uint64_t kFlagZero = 0x02;
constexpr uint64_t kFlagMemSize = 0x04;
constexpr uint64_t kFlagPage = 0x08;
constexpr uint64_t kFlagEos = 0x10;
constexpr uint64_t kFlagContinue = 0x20;
constexpr uint64_t kFlagXbzrle = 0x40;
constexpr uint64_t kFlagHook = 0x80;
constexpr uint64_t kFlagCompressPage = 0x100;
constexpr uint64_t kFlagMultifdFlush = 0x200;

// Commands inside a command section (MIG_CMD_*).
constexpr uint16_t kCmdOpenReturnPath = 1;
constexpr uint16_t kCmdPing = 2;
constexpr uint16_t kCmdPostcopyAdvise = 3;
constexpr uint16_t kCmdPostcopyListen = 4;
constexpr uint16_t kCmdPostcopyRun = 5;
constexpr uint16_t kCmdPostcopyRamDiscard = 6;
constexpr uint16_t kCmdPackaged = 7;

// Return-path messages, destination to source (MIG_RP_MSG_*).
constexpr uint16_t kRpShut = 1;
constexpr uint16_t kRpPong = 2;
constexpr uint16_t kRpReqPagesId = 3;
constexpr uint16_t kRpReqPages = 4;

}  // namespace uffdpc::qemu
