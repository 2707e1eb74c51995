// The official `e2b` JS SDK, unchanged, against a kiln E2B listener: the
// smaller set (create, run, files, kill). Run by sdk-tests/e2b/run.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { Sandbox, CommandExitError } from 'e2b'

test('create, run, files, kill', { timeout: 300_000 }, async () => {
  const sbx = await Sandbox.create({ timeoutMs: 300_000, metadata: { suite: 'js' }, envs: { FROM_JS: 'yes' } })
  try {
    const hi = await sbx.commands.run('echo hi; echo $FROM_JS')
    assert.equal(hi.stdout, 'hi\nyes\n')
    assert.equal(hi.exitCode, 0)
    const six = await sbx.commands.run("python3 -c 'print(6*7)'")
    assert.equal(six.stdout, '42\n')
    await assert.rejects(sbx.commands.run('exit 4'), (e) => e instanceof CommandExitError && e.exitCode === 4)
    const chunks = []
    await sbx.commands.run('echo a; sleep 0.2; echo b', { onStdout: (d) => chunks.push(d) })
    assert.equal(chunks.join(''), 'a\nb\n')
    await sbx.files.write('/tmp/js/hello.txt', 'from js')
    assert.equal(await sbx.files.read('/tmp/js/hello.txt'), 'from js')
    const bytes = new Uint8Array(1 << 20).map((_, i) => i % 251)
    await sbx.files.write('/tmp/js/blob.bin', bytes.buffer)
    const back = await sbx.files.read('/tmp/js/blob.bin', { format: 'bytes' })
    assert.deepEqual(Buffer.from(back), Buffer.from(bytes))
    const names = (await sbx.files.list('/tmp/js')).map((e) => e.name).sort()
    assert.deepEqual(names, ['blob.bin', 'hello.txt'])
    assert.equal(await sbx.files.exists('/tmp/js/none'), false)
  } finally {
    assert.equal(await sbx.kill(), true)
  }
  assert.equal(await sbx.isRunning(), false)
})
