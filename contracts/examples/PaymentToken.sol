// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

/// @title PaymentToken
/// @notice The token the br2k payments example moves: a minimal ERC-20 whose deployer mints.
/// @dev Only what the example and its checker need: balances, transfers (each emitting
/// `Transfer`, which the service verifies deposits by), allowances, and minting by the
/// owner so a test chain can fund the service.
contract PaymentToken {
    /// @notice The token's name.
    string public constant name = "br2k payment token";
    /// @notice The token's symbol.
    string public constant symbol = "BR2KP";
    /// @notice Decimals, as wallets show the amounts.
    uint8 public constant decimals = 18;

    /// @notice The account allowed to mint: the deployer.
    address public immutable owner;
    /// @notice Every token in existence.
    uint256 public totalSupply;
    /// @notice Tokens per account.
    mapping(address account => uint256) public balanceOf;
    /// @notice What a spender may still move from an owner's account.
    mapping(address owner => mapping(address spender => uint256)) public allowance;

    /// @notice `value` tokens moved from `from` to `to` (minted when `from` is zero).
    event Transfer(address indexed from, address indexed to, uint256 value);
    /// @notice `owner` allowed `spender` to move `value` of its tokens.
    event Approval(address indexed owner, address indexed spender, uint256 value);

    /// @notice Only the owner mints.
    error NotOwner(address caller);
    /// @notice `from` holds `balance`, less than the `needed` amount.
    error InsufficientBalance(address from, uint256 balance, uint256 needed);
    /// @notice `spender` may move `allowed`, less than the `needed` amount.
    error InsufficientAllowance(address spender, uint256 allowed, uint256 needed);
    /// @notice Tokens cannot go to the zero address.
    error ZeroAddress();

    constructor() {
        owner = msg.sender;
    }

    /// @notice Creates `value` tokens for `to` (owner only).
    function mint(address to, uint256 value) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        if (to == address(0)) revert ZeroAddress();
        totalSupply += value;
        balanceOf[to] += value;
        emit Transfer(address(0), to, value);
    }

    /// @notice Moves `value` of the caller's tokens to `to`.
    function transfer(address to, uint256 value) external returns (bool) {
        _move(msg.sender, to, value);
        return true;
    }

    /// @notice Allows `spender` to move up to `value` of the caller's tokens.
    function approve(address spender, uint256 value) external returns (bool) {
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    /// @notice Moves `value` of `from`'s tokens to `to`, within the caller's allowance
    /// (an allowance of the largest uint256 never decreases).
    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            if (allowed < value) revert InsufficientAllowance(msg.sender, allowed, value);
            allowance[from][msg.sender] = allowed - value;
        }
        _move(from, to, value);
        return true;
    }

    function _move(address from, address to, uint256 value) private {
        if (to == address(0)) revert ZeroAddress();
        uint256 balance = balanceOf[from];
        if (balance < value) revert InsufficientBalance(from, balance, value);
        unchecked {
            balanceOf[from] = balance - value;
        }
        balanceOf[to] += value;
        emit Transfer(from, to, value);
    }
}
