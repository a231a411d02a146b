// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {Test} from "./utils/Test.sol";
import {PaymentToken} from "../contracts/examples/PaymentToken.sol";

contract PaymentTokenTest is Test {
    event Transfer(address indexed from, address indexed to, uint256 value);

    PaymentToken internal token;
    address internal service = address(0x5E41CE);
    address internal user = address(0xA11CE);
    address internal stranger = address(0xBAD);

    function setUp() public {
        token = new PaymentToken();
        token.mint(service, 1_000_000);
    }

    function test_OnlyTheOwnerMints() public {
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(PaymentToken.NotOwner.selector, stranger));
        token.mint(stranger, 1);
        vm.assertEq(token.totalSupply(), 1_000_000, "supply unchanged");
    }

    function test_TransferMovesTokensAndEmitsTransfer() public {
        vm.expectEmit(address(token));
        emit Transfer(service, user, 250);
        vm.prank(service);
        vm.assertTrue(token.transfer(user, 250), "transfer returns true");
        vm.assertEq(token.balanceOf(service), 999_750, "service debited");
        vm.assertEq(token.balanceOf(user), 250, "user credited");
    }

    function test_TransferBeyondTheBalanceReverts() public {
        vm.prank(user);
        vm.expectRevert(abi.encodeWithSelector(PaymentToken.InsufficientBalance.selector, user, 0, 1));
        token.transfer(service, 1);
    }

    function test_TransferToZeroReverts() public {
        vm.prank(service);
        vm.expectRevert(abi.encodeWithSelector(PaymentToken.ZeroAddress.selector));
        token.transfer(address(0), 1);
    }

    function test_TransferFromSpendsTheAllowance() public {
        vm.prank(service);
        token.approve(user, 100);
        vm.prank(user);
        token.transferFrom(service, stranger, 60);
        vm.assertEq(token.allowance(service, user), 40, "allowance spent");
        vm.prank(user);
        vm.expectRevert(abi.encodeWithSelector(PaymentToken.InsufficientAllowance.selector, user, 40, 41));
        token.transferFrom(service, stranger, 41);
    }

    function testFuzz_TransfersConserveTheSupply(uint256 first, uint256 second) public {
        first = bound(first, 0, 1_000_000);
        vm.prank(service);
        token.transfer(user, first);
        second = bound(second, 0, first);
        vm.prank(user);
        token.transfer(stranger, second);
        vm.assertEq(
            token.balanceOf(service) + token.balanceOf(user) + token.balanceOf(stranger),
            token.totalSupply(),
            "every token is somewhere"
        );
        vm.assertEq(token.balanceOf(stranger), second, "stranger got what was sent");
    }
}
